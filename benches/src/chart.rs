//! Grouped bar charts as SVG, drawn with plotters: one group per path or case, one bar per
//! series, and an optional dashed reference line (a target, or 1.0 for "as fast as the
//! baseline").

use std::path::Path;

use anyhow::anyhow;
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

/// What a chart shows.
pub struct Bars<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    /// Group names, left to right.
    pub groups: Vec<String>,
    /// Series name and one value per group (NaN: no bar).
    pub series: Vec<(String, Vec<f64>)>,
    /// A horizontal line at this value, with its label.
    pub reference: Option<(f64, String)>,
}

const PALETTE: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

/// Draws `bars` into `path` (SVG, 860 x 420).
pub fn draw(path: &Path, bars: &Bars) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    draw_inner(path, bars).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

fn draw_inner(path: &Path, bars: &Bars) -> Result<(), Box<dyn std::error::Error>> {
    let n = bars.groups.len().max(1);
    let top = bars
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .chain(bars.reference.as_ref().map(|r| r.0))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        * 1.35; // headroom for the legend above the bars
    let top = if top > 0.0 { top } else { 1.0 };

    let root = SVGBackend::new(path, (860, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(bars.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(bars.y_label)
        .draw()?;
    // Group names under the middle of each group, placed in pixels (the axis has no tick
    // at the middles).
    let style = ("sans-serif", 14)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (i, group) in bars.groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(group.as_str(), (x, y + 8), style.clone()))?;
    }

    let width = 0.8 / bars.series.len().max(1) as f64;
    for (j, (name, values)) in bars.series.iter().enumerate() {
        let color = PALETTE[j % PALETTE.len()];
        chart
            .draw_series(
                values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(i, &v)| {
                        let x0 = i as f64 + 0.1 + j as f64 * width;
                        Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], color.filled())
                    }),
            )?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    if let Some((value, label)) = &bars.reference {
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, *value), (n as f64, *value)],
                6,
                4,
                BLACK.stroke_width(1),
            ))?
            .label(label.as_str())
            .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK.mix(0.3))
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperMiddle)
        .draw()?;
    root.present()?;
    Ok(())
}

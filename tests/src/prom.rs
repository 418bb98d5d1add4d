//! Reading the Prometheus text format in tests: just enough to look up samples.

/// One sample line: metric name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every sample in `text` (comments skipped). Panics on a line it cannot read: the daemon
/// must never serve one.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_line(l).unwrap_or_else(|| panic!("unreadable sample line {l:?}")))
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => {
            let mut labels = Vec::new();
            let mut rest = rest.strip_suffix('}')?;
            while !rest.is_empty() {
                let (key, after) = rest.split_once("=\"")?;
                // Label values here never contain quotes; escapes would need more care.
                let (value, after) = after.split_once('"')?;
                labels.push((key.to_owned(), value.to_owned()));
                rest = after.strip_prefix(',').unwrap_or(after);
            }
            (name, labels)
        }
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The sum of every sample of `name` whose labels include all of `with`; `None` when there
/// is no such sample.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for s in samples.iter().filter(|s| s.name == name) {
        if with
            .iter()
            .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        {
            *found.get_or_insert(0.0) += s.value;
        }
    }
    found
}

/// [`sum`], panicking with the text when the series is missing.
pub fn get(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    sum(samples, name, with).unwrap_or_else(|| panic!("no sample {name}{with:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_and_summed_by_label_subset() {
        let text = "# HELP x y\n# TYPE a counter\na{k=\"1\",d=\"in\"} 2\na{k=\"2\",d=\"in\"} 3\nb 4.5\nh_bucket{le=\"+Inf\"} 7\n";
        let s = parse(text);
        assert_eq!(s.len(), 4);
        assert_eq!(sum(&s, "a", &[("d", "in")]), Some(5.0));
        assert_eq!(sum(&s, "a", &[("k", "2")]), Some(3.0));
        assert_eq!(sum(&s, "a", &[("k", "3")]), None);
        assert_eq!(get(&s, "b", &[]), 4.5);
        assert_eq!(get(&s, "h_bucket", &[("le", "+Inf")]), 7.0);
    }
}

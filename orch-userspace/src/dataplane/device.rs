//! What kind of device an interface is, which decides where the balancer can run on it.
//!
//! The kernel's ethtool ioctl reports a device's driver and its bus. A device on a bus (a
//! PCI NIC, say), whose driver is not one of the known virtual ones, is hardware, whose driver may run XDP natively and take redirected frames.
//! A device without one is virtual (veth, bridge, VLAN, tunnels): its packets are skbs built
//! by the kernel, often with partial checksums (TX offload, the kernel's default), and XDP
//! on it either runs late (generic mode) or cannot forward to it reliably; the TC hook is
//! the right place there.

use std::{io, os::fd::AsRawFd};

/// `SIOCETHTOOL` (linux/sockios.h) and `ETHTOOL_GDRVINFO` (linux/ethtool.h).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x3;

/// `struct ethtool_drvinfo`.
#[repr(C)]
struct DrvInfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ifreq` with `ifr_data`.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut DrvInfo,
    _pad: [u8; 16],
}

/// Drivers of virtual devices that fill in a bus anyway (`tun`, `tap`) or that might.
const VIRTUAL_DRIVERS: [&str; 12] = [
    "veth",
    "bridge",
    "802.1Q VLAN Support",
    "vxlan",
    "geneve",
    "macvlan",
    "ipvlan",
    "tun",
    "dummy",
    "wireguard",
    "gre",
    "ipip",
];

/// An interface's driver, as the kernel names it, and whether it is hardware.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub driver: String,
    pub hardware: bool,
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Asks the kernel about `iface` (in the current network namespace).
pub fn probe(iface: &str) -> io::Result<Device> {
    if iface.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: plain zeroed C structs.
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    let sock =
        std::net::UdpSocket::bind("0.0.0.0:0").or_else(|_| std::net::UdpSocket::bind("[::]:0"))?;
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at a drvinfo, both alive for the
    // call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let (driver, bus) = (text(&info.driver), text(&info.bus_info));
    // Virtual drivers report no bus, "N/A" (bridge, VLAN) or their own name (tun).
    let hardware = !bus.is_empty() && bus != "N/A" && !VIRTUAL_DRIVERS.contains(&driver.as_str());
    Ok(Device { driver, hardware })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_virtual_and_a_missing_interface_is_an_error() {
        // `lo` exists in every namespace; its driver reports no bus.
        if let Ok(d) = probe("lo") {
            assert!(!d.hardware, "{d:?}");
        }
        assert!(probe("orch-none-such").is_err());
        assert!(probe("a-name-far-too-long-for-linux").is_err());
    }
}

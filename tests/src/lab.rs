//! The lab: a client, a load balancer and N backends, each in its own network namespace.
//!
//! ```text
//!   client ns               lb ns (orch attached to ext, br0)             backend ns i
//!  eth0 198.18.0.2 ----- ext 198.18.0.1      br0 198.18.<i>.1
//!       2001:db8::2          2001:db8::1         2001:db8:<i>::1
//!  default via lb                             └─ port be<i> ------------ eth0 198.18.<i>.2
//!                                                                             2001:db8:<i>::2
//!                                                                        default via lb
//! ```
//! That is [`Topology::Bridge`], the default (Docker's default network is a bridge with the
//! containers' gateway on it). [`Topology::Routed`] gives `be<i>` the gateway addresses
//! instead; [`Topology::VlanClient`] puts the client side on VLAN 100.
//! VIPs (198.19.0.1, 2001:db8:ff::1) are not assigned to any interface: clients route them to
//! the load balancer, where orch translates them. Each backend runs a TCP server (port 8080)
//! and a UDP server (port 8053) that answer every line or datagram with
//! `"<backend name> <what was received>"`.
//!
//! The veths are left as the kernel makes them (TX checksum offload on, GRO off): orch must
//! work on interfaces as users have them.

use std::{
    fmt,
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::netns::{self, Netns};

/// The IPv4 VIP the example config serves.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The IPv6 VIP the example config serves.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
/// The client's addresses.
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// Backend server ports.
pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 8053;
/// Backend HTTP server port: answers any request with `200 OK` and its name as the body,
/// after the backend's configured delay (see [`Backend::set_delay`]).
pub const HTTP_PORT: u16 = 8081;
/// Backend bulk-transfer server port: see [`bulk_get`] and [`bulk_put`].
pub const BULK_PORT: u16 = 8090;
/// Where the daemon serves metrics by default (inside the lb namespace: loopback there is
/// the namespace's own).
pub const METRICS_ADDR: &str = "127.0.0.1:9477";
/// Prefix of every namespace the lab creates (then the pid, so stale ones can be swept).
pub const NS_PREFIX: &str = "orcht";
/// How long one client request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The IPv4 address of backend `i` (1-based).
pub fn backend4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, i as u8, 2)
}

/// The IPv6 address of backend `i` (1-based).
pub fn backend6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, i as u16, 0, 0, 0, 0, 2)
}

/// Whether `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Whether the kernel can create VLAN devices (802.1Q built in or loadable): tried in a
/// namespace of its own, removed at once.
pub fn kernel_has_vlans() -> bool {
    let Ok(ns) = Netns::create(&format!("{NS_PREFIX}{}-vlanprobe", std::process::id())) else {
        return false;
    };
    ns.ip(&[
        "link", "add", "name", "p0", "type", "veth", "peer", "name", "p1",
    ])
    .and_then(|_| {
        ns.ip(&[
            "link", "add", "link", "p0", "name", "p0.7", "type", "vlan", "id", "7",
        ])
    })
    .is_ok()
}

/// A backend host.
#[derive(Debug)]
pub struct Backend {
    /// What its servers answer with: `backend-<i>`.
    pub name: String,
    pub ns: Netns,
    /// While set, the TCP server is closed: connections are refused, as when the service
    /// process has died (established connections are left alone).
    down: Arc<AtomicBool>,
    /// Milliseconds the HTTP server waits before answering.
    delay_ms: Arc<AtomicUsize>,
}

impl Backend {
    /// Makes the HTTP server answer after `delay`: a backend that accepts but is slow.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as usize, Ordering::Relaxed);
    }

    /// Kills (`false`) or revives (`true`) the backend's TCP server. Takes effect within
    /// 100 ms.
    pub fn set_up(&self, up: bool) {
        self.down.store(!up, Ordering::Relaxed);
    }
}

/// How the load balancer's namespace reaches clients and backends. Every variant leaves
/// the devices as the kernel makes them (TX checksum offload on, GRO off on veths).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One routed veth per backend (`be<i>`, holding the backend's gateway address).
    Routed,
    /// The backends are ports of a Linux bridge `br0` that holds their gateway addresses,
    /// as Docker's default network builds it; orch attaches to `ext` and `br0`.
    Bridge,
    /// The client is reached through VLAN 100 on `ext` (`ext.100` holds the addresses);
    /// orch attaches to `ext.100` and the backends' veths.
    VlanClient,
    /// A router between the client and the load balancer, whose link to the client has an
    /// MTU of 1,280 while the client advertises a TCP MSS for 1,500 (as a client does whose
    /// path narrows beyond its own link): large replies need path-MTU discovery, the
    /// router's "fragmentation needed" / "packet too big" going to the VIP. Backends on a
    /// bridge.
    NarrowClientPath,
}

impl Topology {
    /// The load balancer's client-side interface.
    fn client_side(self) -> &'static str {
        match self {
            Topology::VlanClient => "ext.100",
            _ => "ext",
        }
    }
}

/// The whole topology. Dropping it stops the servers and deletes every namespace (which
/// removes every link), also when a test panics.
pub struct Lab {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Backend>,
    pub topology: Topology,
    /// The router of [`Topology::NarrowClientPath`].
    pub router: Option<Netns>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    prefix: String,
    /// The daemon's files (registry, socket) and a private bpffs for its pins.
    state: PathBuf,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab").field("prefix", &self.prefix).finish()
    }
}

static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Lab {
    /// Builds the default topology, the one users have most (backends as ports of a bridge,
    /// as Docker's default network), with `backends` backends, and starts their servers.
    /// `tag` goes into the namespace names, which also carry the pid and a counter so labs
    /// of parallel tests never collide.
    pub fn new(tag: &str, backends: usize) -> io::Result<Lab> {
        Self::with_topology(tag, backends, Topology::Bridge)
    }

    /// [`Lab::new`] in another [`Topology`].
    pub fn with_topology(tag: &str, backends: usize, topology: Topology) -> io::Result<Lab> {
        assert!((1..=200).contains(&backends), "1..=200 backends");
        netns::sweep_stale(NS_PREFIX);
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{}-{n}{tag}-", std::process::id());
        let client = Netns::create(&format!("{prefix}client"))?;
        let lb = Netns::create(&format!("{prefix}lb"))?;
        let state = std::env::temp_dir().join(format!("{prefix}state"));
        let mut lab = Lab {
            client,
            lb,
            backends: Vec::new(),
            topology,
            router: None,
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            prefix,
            state,
        };
        // A bpffs of the lab's own: the daemon's pins live there, not in the host's
        // /sys/fs/bpf (which `ip netns exec` hides anyway), and unmounting it when the lab
        // ends releases every pinned map and link. Mounted before anything else can fail, so
        // the drop below always has it to remove.
        std::fs::create_dir_all(lab.state.join("bpffs"))?;
        nix::mount::mount(
            Some("bpf"),
            &lab.state.join("bpffs"),
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io::Error::other(format!("mounting the lab's bpffs: {e}")))?;
        lab.lb.sysctl("net.ipv4.ip_forward", "1")?;
        lab.lb.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        lab.lb.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        lab.lb.sysctl("net.ipv4.conf.default.rp_filter", "0")?;

        if topology == Topology::NarrowClientPath {
            let router = Netns::create(&format!("{}router", lab.prefix))?;
            router.sysctl("net.ipv4.ip_forward", "1")?;
            router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            link(&lab.lb, "ext", &router, "up0")?;
            configure_end(&lab.lb, "ext", "198.18.100.1/24", "2001:db8:100::1/64")?;
            configure_end(&router, "up0", "198.18.100.2/24", "2001:db8:100::2/64")?;
            link(&router, "down0", &lab.client, "eth0")?;
            for (ns, dev) in [(&router, "down0"), (&lab.client, "eth0")] {
                ns.ip(&["link", "set", "dev", dev, "mtu", "1280"])?;
            }
            configure_end(&router, "down0", "198.18.0.1/24", "2001:db8::1/64")?;
            configure_end(&lab.client, "eth0", "198.18.0.2/24", "2001:db8::2/64")?;
            default_routes(&router, "198.18.100.1", "2001:db8:100::1")?;
            lab.lb
                .ip(&["route", "add", "198.18.0.0/24", "via", "198.18.100.2"])?;
            lab.lb.ip(&[
                "-6",
                "route",
                "add",
                "2001:db8::/64",
                "via",
                "2001:db8:100::2",
            ])?;
            // The client's MSS as if its path were 1,500 bytes wide all the way.
            lab.client.ip(&[
                "route",
                "add",
                "default",
                "via",
                "198.18.0.1",
                "advmss",
                "1460",
            ])?;
            lab.client.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                "2001:db8::1",
                "advmss",
                "1440",
            ])?;
            lab.router = Some(router);
        } else {
            link(&lab.lb, "ext", &lab.client, "eth0")?;
        }
        if topology == Topology::NarrowClientPath {
            // Configured above.
        } else if topology == Topology::VlanClient {
            for (ns, parent) in [(&lab.lb, "ext"), (&lab.client, "eth0")] {
                ns.ip(&["link", "set", "dev", parent, "up"])?;
                let vlan = format!("{parent}.100");
                ns.ip(&[
                    "link", "add", "link", parent, "name", &vlan, "type", "vlan", "id", "100",
                ])?;
            }
            configure_end(&lab.lb, "ext.100", "198.18.0.1/24", "2001:db8::1/64")?;
            configure_end(&lab.client, "eth0.100", "198.18.0.2/24", "2001:db8::2/64")?;
        } else {
            configure_end(&lab.lb, "ext", "198.18.0.1/24", "2001:db8::1/64")?;
            configure_end(&lab.client, "eth0", "198.18.0.2/24", "2001:db8::2/64")?;
        }
        if topology != Topology::NarrowClientPath {
            default_routes(&lab.client, "198.18.0.1", "2001:db8::1")?;
        }
        let bridge = matches!(topology, Topology::Bridge | Topology::NarrowClientPath);
        if bridge {
            lab.lb
                .ip(&["link", "add", "name", "br0", "type", "bridge"])?;
            lab.lb.ip(&["link", "set", "dev", "br0", "up"])?;
        }

        for i in 1..=backends {
            let name = format!("backend-{i}");
            let ns = Netns::create(&format!("{}{name}", lab.prefix))?;
            let lb_if = format!("be{i}");
            link(&lab.lb, &lb_if, &ns, "eth0")?;
            let gateway = if bridge {
                lab.lb
                    .ip(&["link", "set", "dev", &lb_if, "master", "br0", "up"])?;
                "br0"
            } else {
                &lb_if
            };
            lab.lb
                .ip(&["addr", "add", &format!("198.18.{i}.1/24"), "dev", gateway])?;
            lab.lb.ip(&[
                "-6",
                "addr",
                "add",
                &format!("2001:db8:{i:x}::1/64"),
                "dev",
                gateway,
                "nodad",
            ])?;
            lab.lb.ip(&["link", "set", "dev", gateway, "up"])?;
            configure_end(
                &ns,
                "eth0",
                &format!("{}/24", backend4(i)),
                &format!("{}/64", backend6(i)),
            )?;
            default_routes(&ns, &format!("198.18.{i}.1"), &format!("2001:db8:{i:x}::1"))?;
            let down = Arc::new(AtomicBool::new(false));
            let delay_ms = Arc::new(AtomicUsize::new(0));
            let servers = start_servers(&ns, &name, &lab.stop, &down)?;
            lab.servers.extend(servers);
            lab.servers
                .push(start_http(&ns, &name, &lab.stop, &delay_ms)?);
            lab.servers.push(start_bulk(&ns, &name, &lab.stop)?);
            lab.backends.push(Backend {
                name,
                ns,
                down,
                delay_ms,
            });
        }
        Ok(lab)
    }

    /// The load balancer's interfaces orch attaches to: the client side (`ext`, or
    /// `ext.100`) and the backend side (`be1..beN`, or `br0`).
    pub fn lb_interfaces(&self) -> Vec<String> {
        let mut v = vec![self.topology.client_side().to_owned()];
        if matches!(self.topology, Topology::Bridge | Topology::NarrowClientPath) {
            v.push("br0".to_owned());
        } else {
            v.extend((1..=self.backends.len()).map(|i| format!("be{i}")));
        }
        v
    }

    /// Deletes backend `i`'s veth (1-based), as a container's runtime does when it stops
    /// the container. Routed topology: the load balancer's end, `be<i>`, goes with it.
    pub fn unplug_backend(&self, i: usize) -> io::Result<()> {
        self.lb.ip(&["link", "del", &format!("be{i}")])?;
        Ok(())
    }

    /// Creates backend `i`'s veth again, with the addresses and routes it had (routed
    /// topology), as a restarted container gets a new one under the same name.
    pub fn replug_backend(&self, i: usize) -> io::Result<()> {
        assert_eq!(
            self.topology,
            Topology::Routed,
            "replug_backend: routed labs only"
        );
        let (ns, lb_if) = (&self.backends[i - 1].ns, format!("be{i}"));
        link(&self.lb, &lb_if, ns, "eth0")?;
        configure_end(
            &self.lb,
            &lb_if,
            &format!("198.18.{i}.1/24"),
            &format!("2001:db8:{i:x}::1/64"),
        )?;
        configure_end(
            ns,
            "eth0",
            &format!("{}/24", backend4(i)),
            &format!("{}/64", backend6(i)),
        )?;
        default_routes(ns, &format!("198.18.{i}.1"), &format!("2001:db8:{i:x}::1"))
    }

    /// A path for a file that belongs to this lab (config, logs), removed by the caller.
    pub fn scratch_path(&self, what: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{}{what}", self.prefix))
    }

    /// Starts `orch daemon` in the load balancer's namespace with `config` (TOML text, see
    /// [`Lab::orch_config`]) and waits until it serves its API and its program is attached
    /// to every lab interface.
    pub fn start_orch(&self, bin: &Path, config: &str) -> io::Result<Orch> {
        self.start_orch_with(bin, config, &[])
    }

    /// The daemon's `/metrics` text, fetched inside the load balancer's namespace (where
    /// it listens on its default loopback address).
    pub fn metrics(&self) -> io::Result<String> {
        let (status, body) = self.lb_http("GET", "/metrics")?;
        if status != 200 {
            return Err(io::Error::other(format!(
                "/metrics answered {status}: {body}"
            )));
        }
        Ok(body)
    }

    /// One request to the daemon's metrics listener, from inside the lb namespace.
    pub fn lb_http(&self, method: &str, path: &str) -> io::Result<(u16, String)> {
        let (method, path) = (method.to_owned(), path.to_owned());
        self.lb
            .run(move || http_request(METRICS_ADDR.parse().expect("valid"), &method, &path))?
    }

    /// Where the daemon this lab starts pins its maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        self.state.join("bpffs/orch")
    }

    /// [`Lab::start_orch`] with extra `orch daemon` arguments.
    pub fn start_orch_with(&self, bin: &Path, config: &str, args: &[&str]) -> io::Result<Orch> {
        let config_path = self.scratch_path("orch.toml");
        let mut orch = Orch {
            child: None,
            bin: bin.to_owned(),
            args: args.iter().map(|a| a.to_string()).collect(),
            config_path,
            log_path: self.scratch_path("orch.log"),
            socket: self.state.join("orch.sock"),
            pin_dir: self.state.join("bpffs/orch"),
            registry: self.state.join("registry.db"),
            lb: self.lb.name().to_owned(),
            interfaces: self.lb_interfaces(),
            exited: None,
            unprivileged: None,
            env: Vec::new(),
        };
        orch.write_config(config)?;
        orch.start()?;
        Ok(orch)
    }

    /// [`Lab::start_orch`] as the systemd unit runs it: as user `uid` (group `gid`) with
    /// only the capabilities `caps` (ambient, like `AmbientCapabilities=`), and `env` added.
    /// The lab's state directory and pin directory are handed to that user first, as the
    /// unit's `StateDirectory=`, `RuntimeDirectory=` and pre-start step do.
    pub fn start_orch_unprivileged(
        &self,
        bin: &Path,
        config: &str,
        who: Unprivileged,
        env: &[(&str, &str)],
    ) -> io::Result<Orch> {
        let pins = self.state.join("bpffs/orch");
        std::fs::create_dir_all(&pins)?;
        for dir in [&self.state, &pins] {
            std::os::unix::fs::chown(dir, Some(who.uid), Some(who.gid))?;
        }
        let config_path = self.scratch_path("orch.toml");
        let mut orch = Orch {
            child: None,
            bin: bin.to_owned(),
            args: Vec::new(),
            config_path,
            log_path: self.scratch_path("orch.log"),
            socket: self.state.join("orch.sock"),
            pin_dir: pins,
            registry: self.state.join("registry.db"),
            lb: self.lb.name().to_owned(),
            interfaces: self.lb_interfaces(),
            exited: None,
            unprivileged: Some(who),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        orch.write_config(config)?;
        orch.start()?;
        Ok(orch)
    }
}

/// Who an unprivileged daemon runs as (see [`Lab::start_orch_unprivileged`]).
#[derive(Clone, Debug)]
pub struct Unprivileged {
    pub uid: u32,
    pub gid: u32,
    /// Capability names as `setpriv` takes them: `bpf`, `net_admin`...
    pub caps: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
        // Unmounting the lab's bpffs unpins everything orch left (it keeps running by
        // design); the namespaces (fields) are deleted after this, which removes every link.
        let _ = nix::mount::umount2(&self.state.join("bpffs"), nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Creates a veth pair with one end in each namespace (never in the host's).
pub(crate) fn link(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> io::Result<()> {
    netns::run(
        "ip",
        &[
            "link",
            "add",
            "name",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ],
    )?;
    Ok(())
}

fn configure_end(ns: &Netns, ifname: &str, v4: &str, v6: &str) -> io::Result<()> {
    ns.ip(&["addr", "add", v4, "dev", ifname])?;
    ns.ip(&["-6", "addr", "add", v6, "dev", ifname, "nodad"])?;
    ns.ip(&["link", "set", "dev", ifname, "up"])?;
    Ok(())
}

fn default_routes(ns: &Netns, gw4: &str, gw6: &str) -> io::Result<()> {
    ns.ip(&["route", "add", "default", "via", gw4])?;
    ns.ip(&["-6", "route", "add", "default", "via", gw6])?;
    Ok(())
}

/// Makes blocking `accept`/`recv` return every `timeout` so loops can notice `stop`.
pub fn set_recv_timeout(fd: &impl AsRawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid fd and a timeval of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds the backend's servers inside its namespace and serves them on threads.
/// The backend's HTTP server: reads a request head, waits the configured delay, answers
/// `200 OK` with the backend's name.
fn start_http(
    ns: &Netns,
    name: &str,
    stop: &Arc<AtomicBool>,
    delay_ms: &Arc<AtomicUsize>,
) -> io::Result<JoinHandle<()>> {
    let listener = ns.run(|| -> io::Result<TcpListener> {
        let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, HTTP_PORT))?;
        set_recv_timeout(&l, Duration::from_millis(100))?;
        Ok(l)
    })??;
    let (name, stop, delay_ms) = (name.to_owned(), stop.clone(), delay_ms.clone());
    thread::Builder::new()
        .name(format!("{name}-http"))
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (name, delay) = (name.clone(), delay_ms.load(Ordering::Relaxed));
                        thread::spawn(move || {
                            let _ = serve_http(conn, &name, Duration::from_millis(delay as u64));
                        });
                    }
                    Err(e) if is_timeout(&e) => {}
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        })
}

fn serve_http(conn: TcpStream, name: &str, delay: Duration) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    // The request head ends with an empty line.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            break;
        }
    }
    thread::sleep(delay);
    write!(
        writer,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
        name.len()
    )
}

/// One HTTP GET through `addr`: the body (the answering backend's name).
pub fn http_get(addr: SocketAddr) -> io::Result<String> {
    let (status, body) = http_request(addr, "GET", "/")?;
    if status != 200 {
        return Err(io::Error::other(format!("HTTP {status}: {body:?}")));
    }
    Ok(body)
}

/// One HTTP/1.1 request without a body to `addr`: the status code and the body.
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> io::Result<(u16, String)> {
    http_request_within(addr, method, path, REQUEST_TIMEOUT)
}

/// [`http_request`] with its own time limit for the answer.
pub fn http_request_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    limit: Duration,
) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    s.set_read_timeout(Some(limit))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    io::Read::read_to_string(&mut s, &mut answer)?;
    let malformed = || io::Error::other(format!("malformed HTTP answer {answer:?}"));
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}

/// Byte `i` of every bulk transfer: a pattern without short periods, so that a segment
/// delivered at the wrong offset or with wrong bytes is caught where it lands.
pub fn bulk_byte(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (i >> 12) as u8
}

/// Serves bulk transfers on [`BULK_PORT`]: a line `get N` is answered with the backend's
/// name, a newline and N pattern bytes; a line `put N`, followed by N bytes, with `ok N` if
/// they are the pattern, `bad AT` at the first byte that is not.
fn start_bulk(ns: &Netns, name: &str, stop: &Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
    let listener = ns.run(|| -> io::Result<TcpListener> {
        let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, BULK_PORT))?;
        set_recv_timeout(&l, Duration::from_millis(100))?;
        Ok(l)
    })??;
    let (name, stop) = (name.to_owned(), stop.clone());
    thread::Builder::new()
        .name(format!("{name}-bulk"))
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let name = name.clone();
                        thread::spawn(move || {
                            let _ = serve_bulk(conn, &name);
                        });
                    }
                    Err(e) if is_timeout(&e) => {}
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        })
}

fn serve_bulk(conn: TcpStream, name: &str) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let (verb, n) = (
        words.next(),
        words.next().and_then(|n| n.parse::<u64>().ok()),
    );
    match (verb, n) {
        (Some("get"), Some(n)) => {
            writer.write_all(format!("{name}\n").as_bytes())?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut at = 0u64;
            while at < n {
                let len = (n - at).min(buf.len() as u64) as usize;
                for (k, b) in buf[..len].iter_mut().enumerate() {
                    *b = bulk_byte(at + k as u64);
                }
                writer.write_all(&buf[..len])?;
                at += len as u64;
            }
            Ok(())
        }
        (Some("put"), Some(n)) => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut at = 0u64;
            while at < n {
                let want = (n - at).min(buf.len() as u64) as usize;
                let got = io::Read::read(&mut reader, &mut buf[..want])?;
                if got == 0 {
                    break;
                }
                if let Some(k) = (0..got).find(|&k| buf[k] != bulk_byte(at + k as u64)) {
                    return writeln!(writer, "bad {}", at + k as u64);
                }
                at += got as u64;
            }
            writeln!(writer, "ok {at}")
        }
        _ => writeln!(writer, "bad request"),
    }
}

/// Downloads `n` bytes from the bulk server behind `addr` and checks every byte: the name
/// of the backend that sent them.
pub fn bulk_get(addr: SocketAddr, n: u64, timeout: Duration) -> io::Result<String> {
    let s = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    s.set_read_timeout(Some(timeout))?;
    let mut w = s.try_clone()?;
    writeln!(w, "get {n}")?;
    let mut r = BufReader::new(s);
    let mut name = String::new();
    r.read_line(&mut name)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    loop {
        let got = io::Read::read(&mut r, &mut buf)?;
        if got == 0 {
            break;
        }
        if let Some(k) = (0..got).find(|&k| buf[k] != bulk_byte(at + k as u64)) {
            return Err(io::Error::other(format!("byte {} differs", at + k as u64)));
        }
        at += got as u64;
    }
    if at != n {
        return Err(io::Error::other(format!("{at} of {n} bytes arrived")));
    }
    Ok(name.trim().to_owned())
}

/// Uploads `n` pattern bytes to the bulk server behind `addr`, which checks every byte.
pub fn bulk_put(addr: SocketAddr, n: u64, timeout: Duration) -> io::Result<()> {
    let s = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut w = s.try_clone()?;
    writeln!(w, "put {n}")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    while at < n {
        let len = (n - at).min(buf.len() as u64) as usize;
        for (k, b) in buf[..len].iter_mut().enumerate() {
            *b = bulk_byte(at + k as u64);
        }
        w.write_all(&buf[..len])?;
        at += len as u64;
    }
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    if answer.trim() != format!("ok {n}") {
        return Err(io::Error::other(format!("the backend answered {answer:?}")));
    }
    Ok(())
}

pub(crate) fn start_servers(
    ns: &Netns,
    name: &str,
    stop: &Arc<AtomicBool>,
    down: &Arc<AtomicBool>,
) -> io::Result<Vec<JoinHandle<()>>> {
    // `[::]` with the default bindv6only=0 accepts IPv4 too (as IPv4-mapped addresses).
    let bind_tcp = || -> io::Result<TcpListener> {
        let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, TCP_PORT))?;
        set_recv_timeout(&l, Duration::from_millis(100))?;
        Ok(l)
    };
    let (tcp, udp) = ns.run(move || -> io::Result<(TcpListener, UdpSocket)> {
        Ok((
            bind_tcp()?,
            UdpSocket::bind((Ipv6Addr::UNSPECIFIED, UDP_PORT))?,
        ))
    })??;
    udp.set_read_timeout(Some(Duration::from_millis(100)))?;

    // The TCP server runs inside the namespace so that it can bind again after `down`.
    let tcp_server = {
        let (name, stop, down) = (name.to_owned(), stop.clone(), down.clone());
        ns.spawn(move || {
            let mut tcp = Some(tcp);
            while !stop.load(Ordering::Relaxed) {
                if down.load(Ordering::Relaxed) {
                    tcp = None;
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let Some(listener) = tcp.as_ref() else {
                    tcp = bind_tcp().ok();
                    thread::sleep(Duration::from_millis(20));
                    continue;
                };
                match listener.accept() {
                    Ok((conn, _)) => {
                        let name = name.clone();
                        thread::spawn(move || {
                            let _ = serve_tcp(conn, &name);
                        });
                    }
                    Err(e) if is_timeout(&e) => {}
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        })?
    };
    let udp_server = {
        let (name, stop) = (name.to_owned(), stop.clone());
        thread::Builder::new()
            .name(format!("{name}-udp"))
            .spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    match udp.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            let text = String::from_utf8_lossy(&buf[..n]);
                            let text = text.trim_end();
                            let mut reply = format!("{name} {text}").into_bytes();
                            // `big N`: N pattern bytes more, an answer larger than the MTU.
                            if let Some(n) = text
                                .strip_prefix("big ")
                                .and_then(|n| n.parse::<u64>().ok())
                            {
                                reply.push(b'\n');
                                reply.extend((0..n.min(60_000u64)).map(bulk_byte));
                            }
                            let _ = udp.send_to(&reply, from);
                        }
                        Err(e) if is_timeout(&e) => {}
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })?
    };
    Ok(vec![tcp_server, udp_server])
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Answers each line with `"<name> <line>"` until the client closes (or stays quiet for
/// two minutes: longer than any test holds an idle connection).
fn serve_tcp(conn: TcpStream, name: &str) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut writer = conn.try_clone()?;
    for line in BufReader::new(conn).lines() {
        writeln!(writer, "{name} {}", line?)?;
    }
    Ok(())
}

/// A client-side TCP connection speaking the lab's line protocol.
#[derive(Debug)]
pub struct LineConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl LineConn {
    /// Connects (must run on a thread inside the client namespace).
    pub fn connect(addr: SocketAddr) -> io::Result<LineConn> {
        Self::from_stream(TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?)
    }

    /// Speaks the line protocol on a stream connected by other means.
    pub fn from_stream(s: TcpStream) -> io::Result<LineConn> {
        s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(LineConn {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    /// Sends `line`, returns the backend's name from its answer.
    pub fn ask(&mut self, line: &str) -> io::Result<String> {
        writeln!(self.writer, "{line}")?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let (name, echoed) = answer
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| io::Error::other(format!("malformed answer {answer:?}")))?;
        if echoed != line {
            return Err(io::Error::other(format!(
                "answer {answer:?} does not echo {line:?}"
            )));
        }
        Ok(name.to_owned())
    }

    /// The local address (the client's port identifies the flow).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    /// The address the client is connected to, as its kernel sees it.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.writer.peer_addr()
    }
}

/// One TCP connection, one question: which backend answered.
pub fn tcp_ask(addr: SocketAddr, line: &str) -> io::Result<String> {
    LineConn::connect(addr)?.ask(line)
}

/// Sends one UDP datagram from `sock` to `addr`; returns the backend's name and the address
/// the answer came from (which must be the VIP, not the backend).
pub fn udp_ask(sock: &UdpSocket, addr: SocketAddr, line: &str) -> io::Result<(String, SocketAddr)> {
    sock.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    sock.send_to(line.as_bytes(), addr)?;
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf)?;
    let answer = String::from_utf8_lossy(&buf[..n]);
    let (name, echoed) = answer
        .split_once(' ')
        .ok_or_else(|| io::Error::other(format!("malformed answer {answer:?}")))?;
    if echoed != line {
        return Err(io::Error::other(format!(
            "answer {answer:?} does not echo {line:?}"
        )));
    }
    Ok((name.to_owned(), from))
}

/// Asks the UDP server behind `addr` for an answer of `n` pattern bytes (larger than the
/// MTU, it arrives in fragments) and checks every byte: the answering backend's name.
///
/// Asked up to three times, a second apart, as a resolver would: an answer lost to a path
/// narrower than the backend knows (IPv6 routers send "packet too big" and drop it) is sent
/// again, narrower, once the backend has learnt the path.
pub fn udp_big(sock: &UdpSocket, addr: SocketAddr, n: u64) -> io::Result<String> {
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let line = format!("big {n}");
    let mut buf = vec![0u8; 65_536];
    let mut tries = 0;
    let got = loop {
        sock.send_to(line.as_bytes(), addr)?;
        match sock.recv_from(&mut buf) {
            Ok((got, _)) => break got,
            Err(e) if is_timeout(&e) && tries < 2 => tries += 1,
            Err(e) => return Err(e),
        }
    };
    let answer = &buf[..got];
    let newline = answer
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| io::Error::other("an answer without its body"))?;
    let head = String::from_utf8_lossy(&answer[..newline]);
    let (name, echoed) = head
        .split_once(' ')
        .ok_or_else(|| io::Error::other(format!("malformed answer {head:?}")))?;
    let body = &answer[newline + 1..];
    if echoed != line || body.len() as u64 != n {
        return Err(io::Error::other(format!(
            "answer {head:?} with {} body bytes to {line:?}",
            body.len()
        )));
    }
    if let Some(i) = (0..body.len()).find(|&i| body[i] != bulk_byte(i as u64)) {
        return Err(io::Error::other(format!("byte {i} differs")));
    }
    Ok(name.to_owned())
}

/// A UDP socket for the client side, bound to any port of the right family.
pub fn udp_socket(for_addr: IpAddr) -> io::Result<UdpSocket> {
    match for_addr {
        IpAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// Pins the calling thread to one CPU. orch keeps one round-robin cursor per CPU, so a
/// client that wants to see a single rotation (the demo, the packet tests) stays on one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(io::Error::from)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io::Error::from)
}

/// The ids of the programs attached to `iface` in namespace `ns`, as the kernel reports
/// them: XDP (from `ip link`) and TC ingress through TCX links (`BPF_PROG_QUERY`, which
/// `ip` and `tc` do not show).
pub fn programs_on(ns: &str, iface: &str) -> io::Result<Vec<u32>> {
    let out = netns::run("ip", &["-n", ns, "-d", "link", "show", "dev", iface])?;
    let mut ids = Vec::new();
    if let Some(at) = out.find("prog/xdp id ") {
        let id = out[at + "prog/xdp id ".len()..].split_whitespace().next();
        ids.extend(id.and_then(|i| i.parse::<u32>().ok()));
    }
    let iface = iface.to_owned();
    ids.extend(netns::run_in(ns, move || tcx_ingress_programs(&iface))??);
    Ok(ids)
}

/// `BPF_PROG_QUERY` for `BPF_TCX_INGRESS` on `iface`, in this thread's namespace.
fn tcx_ingress_programs(iface: &str) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    let index = nix::net::if_::if_nametoindex(iface)?;
    let mut ids = [0u32; 16];
    // `union bpf_attr`, query: target_ifindex, attach_type, query_flags, attach_flags,
    // prog_ids (u64), prog_cnt, and zeroed room for the rest.
    let mut attr = [0u64; 8];
    attr[0] = u64::from(index) | u64::from(BPF_TCX_INGRESS) << 32;
    attr[2] = ids.as_mut_ptr() as u64;
    attr[3] = ids.len() as u64;
    // SAFETY: the attribute points at `ids`, of the length given, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let count = (attr[3] & 0xffff_ffff) as usize;
    Ok(ids[..count.min(ids.len())].to_vec())
}

/// Whether the balancer runs on `iface` in namespace `ns` (at XDP or TC).
pub fn balancer_attached(ns: &str, iface: &str) -> io::Result<bool> {
    Ok(!programs_on(ns, iface)?.is_empty())
}

/// A running `orch daemon` with the lab's private paths. Dropping it stops the daemon
/// (SIGTERM, then SIGKILL) and removes its config and log files; the lab removes the rest.
#[derive(Debug)]
pub struct Orch {
    child: Option<Child>,
    bin: PathBuf,
    args: Vec<String>,
    /// Runs the daemon as this user with only these capabilities, as the systemd unit
    /// does; `None`: as root.
    unprivileged: Option<Unprivileged>,
    /// Extra environment for the daemon.
    env: Vec<(String, String)>,
    config_path: PathBuf,
    log_path: PathBuf,
    socket: PathBuf,
    pin_dir: PathBuf,
    registry: PathBuf,
    lb: String,
    interfaces: Vec<String>,
    exited: Option<ExitStatus>,
}

impl Orch {
    /// A daemon (not started) in namespace `ns`, attached to `interfaces`, with its files
    /// (config, log, socket, registry) in `state` and its pins in `state/bpffs`, which the
    /// caller mounts and unmounts.
    pub(crate) fn in_namespace(
        bin: &Path,
        ns: &str,
        state: &Path,
        interfaces: Vec<String>,
    ) -> Orch {
        Orch {
            child: None,
            bin: bin.to_owned(),
            args: Vec::new(),
            config_path: state.join("orch.toml"),
            log_path: state.join("orch.log"),
            socket: state.join("orch.sock"),
            pin_dir: state.join("bpffs/orch"),
            registry: state.join("registry.db"),
            lb: ns.to_owned(),
            interfaces,
            exited: None,
            unprivileged: None,
            env: Vec::new(),
        }
    }

    /// What the daemon has logged so far (every run since the lab started it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The admin socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The config file the daemon watches.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Replaces the config file in one step (write aside, rename), as careful editors do.
    /// `config` is the test's TOML; the lab's private paths are added (see
    /// [`Orch::with_lab_paths`]).
    pub fn write_config(&self, config: &str) -> io::Result<()> {
        let text = self.with_lab_paths(config);
        let tmp = self.config_path.with_extension("toml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.config_path)
    }

    /// `config` with this lab's pin directory, registry and socket: a `pin_dir` line right
    /// after `[dataplane]` (so line numbers below it move by one) and `[registry]`/`[api]`
    /// tables at the end.
    pub fn with_lab_paths(&self, config: &str) -> String {
        let mut out = String::new();
        for line in config.lines() {
            out.push_str(line);
            out.push('\n');
            if line.trim() == "[dataplane]" {
                out.push_str(&format!("pin_dir = {:?}\n", self.pin_dir));
            }
        }
        out.push_str(&format!(
            "\n[registry]\npath = {:?}\n\n[api]\nsocket = {:?}\n",
            self.registry, self.socket
        ));
        out
    }

    /// Starts the daemon (again) and waits until it is ready.
    pub fn start(&mut self) -> io::Result<()> {
        assert!(self.child.is_none(), "orch is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.lb]);
        if let Some(who) = &self.unprivileged {
            // `setpriv` changes the user and execs: the child's pid stays the daemon's.
            let caps: Vec<String> = who.caps.iter().map(|c| format!("+{c}")).collect();
            cmd.arg("setpriv")
                .arg(format!("--reuid={}", who.uid))
                .arg(format!("--regid={}", who.gid))
                .arg("--clear-groups")
                .arg(format!("--inh-caps={}", caps.join(",")))
                .arg(format!("--ambient-caps={}", caps.join(",")));
        }
        let child = cmd
            .arg(&self.bin)
            .args(["daemon", "--config"])
            .arg(&self.config_path)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io::Error::new(e.kind(), format!("starting {}: {e}", self.bin.display()))
            })?;
        self.child = Some(child);
        self.exited = None;
        self.wait_ready(Duration::from_secs(20))
    }

    /// Waits until this run of the daemon answers on its socket (its own pid in `status`)
    /// and XDP is attached to every lab interface.
    fn wait_ready(&mut self, limit: Duration) -> io::Result<()> {
        let start = Instant::now();
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    self.exited = Some(status);
                    return Err(io::Error::other(format!(
                        "orch exited with {status} before it was ready; its log:\n{}",
                        self.log()
                    )));
                }
            }
            let serving = self
                .cli(&["status", "--json"])
                .map(|o| {
                    o.status.success() && o.stdout_text().contains(&format!("\"pid\": {pid},"))
                })
                .unwrap_or(false);
            let mut attached = true;
            for i in &self.interfaces {
                attached &= balancer_attached(&self.lb, i)?;
            }
            if serving && attached {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(io::Error::other(format!(
                    "orch was not ready within {limit:?}; its log:\n{}",
                    self.log()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The backend rows of `service` as `orch backend list --json` gives them (panics, in a
    /// test, when the CLI fails: the daemon must keep answering).
    pub fn backend_rows(&self, service: &str) -> Vec<serde_json::Value> {
        let out = self
            .cli(&["backend", "list", service, "--json"])
            .expect("running the CLI");
        assert!(out.status.success(), "{}", out.stderr_text());
        let v: serde_json::Value = serde_json::from_str(&out.stdout_text()).unwrap();
        v["backends"].as_array().unwrap().clone()
    }

    /// The row of backend `address` of `service` (see [`Orch::backend_rows`]).
    pub fn backend_row(&self, service: &str, address: &str) -> serde_json::Value {
        self.backend_rows(service)
            .into_iter()
            .find(|b| b["address"] == address)
            .unwrap_or_else(|| panic!("no backend {address} in {service}"))
    }

    /// Whether backend `address` of `service` takes new connections.
    pub fn in_rotation(&self, service: &str, address: &str) -> bool {
        self.backend_row(service, address)["in_rotation"] == true
    }

    /// Runs the `orch` CLI against this daemon's socket (from the host namespace: a Unix
    /// socket is a file, reachable from any network namespace).
    /// [`Orch::cli`] for another thread: runs the CLI against this daemon's socket.
    pub fn cli_command(&self) -> impl Fn(&[&str]) -> CliOutput + Send + 'static {
        let (bin, socket) = (self.bin.clone(), self.socket.clone());
        move |args| {
            CliOutput(
                Command::new(&bin)
                    .args(args)
                    .env("ORCH_SOCKET", &socket)
                    .stdin(Stdio::null())
                    .output()
                    .expect("running the orch CLI"),
            )
        }
    }

    pub fn cli(&self, args: &[&str]) -> io::Result<CliOutput> {
        let out = Command::new(&self.bin)
            .args(args)
            .env("ORCH_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .output()?;
        Ok(CliOutput(out))
    }

    /// Sends SIGTERM and waits (up to 10 s) for the exit status; SIGKILL after that.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return self
                .exited
                .ok_or_else(|| io::Error::other("orch was never started"));
        };
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(s) = child.try_wait()? {
                self.exited = Some(s);
                return Ok(s);
            }
            thread::sleep(Duration::from_millis(20));
        }
        child.kill()?;
        let s = child.wait()?;
        self.exited = Some(s);
        Err(io::Error::other(format!(
            "orch ignored SIGTERM for 10 s; killed ({s})"
        )))
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the running daemon.
    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn signal(&self, signal: i32) -> io::Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| io::Error::other("orch is not running"))?;
        // SAFETY: signalling our own child, which has not been reaped yet.
        if unsafe { libc::kill(child.id() as i32, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// SIGKILL, as a crash or the OOM killer would: no cleanup of any kind.
    pub fn kill9(&mut self) -> io::Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| io::Error::other("orch is not running"))?;
        child.kill()?;
        let s = child.wait()?;
        self.exited = Some(s);
        Ok(s)
    }

    /// The interfaces it was started on, with whether the balancer is still attached to each.
    pub fn attachment(&self) -> io::Result<Vec<(String, bool)>> {
        self.interfaces
            .iter()
            .map(|i| Ok((i.clone(), balancer_attached(&self.lb, i)?)))
            .collect()
    }

    /// Whether anything is left in the pin directory.
    pub fn pins_left(&self) -> bool {
        self.pin_dir.exists()
    }
}

impl Drop for Orch {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_file(&self.config_path);
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// What a CLI run printed and how it exited.
#[derive(Debug)]
pub struct CliOutput(pub std::process::Output);

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.0.status.code()
    }
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
}

impl std::ops::Deref for CliOutput {
    type Target = std::process::Output;
    fn deref(&self) -> &std::process::Output {
        &self.0
    }
}

/// The `orch` binary the tests run: `$ORCH_BIN`, or the workspace's debug build.
pub fn orch_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ORCH_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/orch");
    assert!(
        bin.exists(),
        "{} not found: build it with `cargo build -p orch-userspace` (`cargo xtask test` does), \
         or set ORCH_BIN",
        bin.display()
    );
    bin
}

/// The example configuration shipped in the repository, which matches this lab's topology
/// for three backends.
pub fn example_config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.toml")
}

/// The text of [`example_config_path`]; panics (in a test) when it cannot be read.
pub fn demo_config() -> String {
    std::fs::read_to_string(example_config_path()).expect("reading examples/demo.toml")
}

/// Polls `cond` every 20 ms for up to `limit`; returns how long it took to hold.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

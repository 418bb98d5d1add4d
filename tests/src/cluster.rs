//! Three orch hosts sharing one registry through a three-member etcd cluster.
//!
//! ```text
//!                    core ns: bridge br0, 198.18.50.0/24 (etcd's network)
//!          ctl 198.18.50.1 |        ctl 198.18.50.2 |        ctl 198.18.50.3 |
//!   host-1 ns (orch, etcd m1)  host-2 ns (orch, etcd m2)  host-3 ns (orch, etcd m3)
//!     c0 198.18.61.1            c0 198.18.62.1            c0 198.18.63.1
//!     b1 b2 b3 -----+           b1 b2 b3                  b1 b2 b3
//!                   |  (a /30 link from every host to every backend)
//!   backend-i ns: 198.18.70.<i> (on lo), servers on :8080/:8053; replies to the client's
//!   address 198.18.6<k>.2 go back through host k
//!   client ns: 198.18.6<k>.2 on its link to host k; a socket bound to that address
//!   leaves through host k (policy routing), so the test picks the host by source address
//! ```
//! As hosts behind ECMP: every host reaches every backend, and a backend answers a client
//! through the host that client's address belongs to. Dropping the lab stops the daemons
//! and etcd, deletes the namespaces and every file.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{
    lab::{self, LineConn, Orch, NS_PREFIX, REQUEST_TIMEOUT},
    netns::{self, Netns},
};

/// Hosts and backends of the lab.
pub const HOSTS: usize = 3;
pub const BACKENDS: usize = 3;

/// The address of backend `i` (1-based), reachable from every host.
pub fn backend(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 70, i as u8)
}

/// The client's address whose traffic goes through host `k` (1-based).
pub fn client_via(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 60 + k as u8, 2)
}

/// Host `k`'s address on etcd's network.
pub fn ctl(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 50, k as u8)
}

/// One host: its namespace, its daemon, its etcd member.
pub struct Host {
    pub ns: Netns,
    pub orch: Orch,
    etcd: Option<Child>,
    state: PathBuf,
}

pub struct ClusterLab {
    pub hosts: Vec<Host>,
    pub client: Netns,
    pub backends: Vec<Netns>,
    core: Netns,
    /// Extra `[dataplane]` lines of every host.
    dataplane: String,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    state: PathBuf,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl ClusterLab {
    /// Builds the lab, starts etcd on every host and waits for its quorum, then starts
    /// orch on every host with `services` (TOML `[[service]]` tables, or "") as host `k`'s
    /// config-file services, `files(k)`.
    pub fn new(tag: &str, bin: &Path, files: impl Fn(usize) -> String) -> io::Result<ClusterLab> {
        Self::with_dataplane(tag, bin, "", files)
    }

    /// [`ClusterLab::new`] with `dataplane` (TOML lines: capacities) added to every host's
    /// `[dataplane]`.
    pub fn with_dataplane(
        tag: &str,
        bin: &Path,
        dataplane: &str,
        files: impl Fn(usize) -> String,
    ) -> io::Result<ClusterLab> {
        netns::sweep_stale(NS_PREFIX);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{}-{n}{tag}-", std::process::id());
        let state = std::env::temp_dir().join(format!("{prefix}state"));
        std::fs::create_dir_all(&state)?;
        let core = Netns::create(&format!("{prefix}core"))?;
        let client = Netns::create(&format!("{prefix}client"))?;
        let mut lab = ClusterLab {
            dataplane: dataplane.to_owned(),
            hosts: Vec::new(),
            client,
            backends: Vec::new(),
            core,
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            state,
        };
        lab.core
            .ip(&["link", "add", "name", "br0", "type", "bridge"])?;
        lab.core.ip(&["link", "set", "dev", "br0", "up"])?;
        lab.client.ip(&["link", "set", "dev", "lo", "up"])?;
        let mut host_ns = Vec::new();
        for k in 1..=HOSTS {
            let ns = Netns::create(&format!("{prefix}host-{k}"))?;
            ns.ip(&["link", "set", "dev", "lo", "up"])?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            let port = format!("h{k}");
            lab::link(&ns, "ctl", &lab.core, &port)?;
            lab.core
                .ip(&["link", "set", "dev", &port, "master", "br0", "up"])?;
            ns.ip(&["addr", "add", &format!("{}/24", ctl(k)), "dev", "ctl"])?;
            ns.ip(&["link", "set", "dev", "ctl", "up"])?;
            // The client's link to this host, and its routing table for this source.
            lab::link(&ns, "c0", &lab.client, &port)?;
            ns.ip(&[
                "addr",
                "add",
                &format!("198.18.{}.1/24", 60 + k),
                "dev",
                "c0",
            ])?;
            ns.ip(&["link", "set", "dev", "c0", "up"])?;
            let table = (100 + k).to_string();
            lab.client.ip(&[
                "addr",
                "add",
                &format!("{}/24", client_via(k)),
                "dev",
                &port,
            ])?;
            lab.client.ip(&["link", "set", "dev", &port, "up"])?;
            lab.client.ip(&[
                "rule",
                "add",
                "from",
                &client_via(k).to_string(),
                "lookup",
                &table,
            ])?;
            lab.client.ip(&[
                "route",
                "add",
                "default",
                "via",
                &format!("198.18.{}.1", 60 + k),
                "table",
                &table,
            ])?;
            host_ns.push(ns);
        }
        for i in 1..=BACKENDS {
            let ns = Netns::create(&format!("{prefix}backend-{i}"))?;
            ns.ip(&["link", "set", "dev", "lo", "up"])?;
            ns.ip(&["addr", "add", &format!("{}/32", backend(i)), "dev", "lo"])?;
            for (k, host) in host_ns.iter().enumerate().map(|(k, h)| (k + 1, h)) {
                let (here, there) = (format!("b{i}"), format!("h{k}"));
                lab::link(host, &here, &ns, &there)?;
                let (h, b) = (
                    format!("198.18.{}.{}", 100 + k, 4 * i + 1),
                    format!("198.18.{}.{}", 100 + k, 4 * i + 2),
                );
                host.ip(&["addr", "add", &format!("{h}/30"), "dev", &here])?;
                host.ip(&["link", "set", "dev", &here, "up"])?;
                host.ip(&["route", "add", &format!("{}/32", backend(i)), "via", &b])?;
                ns.ip(&["addr", "add", &format!("{b}/30"), "dev", &there])?;
                ns.ip(&["link", "set", "dev", &there, "up"])?;
                ns.ip(&[
                    "route",
                    "add",
                    &format!("198.18.{}.0/24", 60 + k),
                    "via",
                    &h,
                ])?;
            }
            let down = Arc::new(AtomicBool::new(false));
            let servers = lab::start_servers(&ns, &format!("backend-{i}"), &lab.stop, &down)?;
            lab.servers.extend(servers);
            lab.backends.push(ns);
        }
        for (k, ns) in host_ns.into_iter().enumerate().map(|(k, n)| (k + 1, n)) {
            let state = lab.state.join(format!("host-{k}"));
            std::fs::create_dir_all(state.join("bpffs"))?;
            nix::mount::mount(
                Some("bpf"),
                &state.join("bpffs"),
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| io::Error::other(format!("mounting host {k}'s bpffs: {e}")))?;
            let interfaces = ["c0", "b1", "b2", "b3"].map(String::from).to_vec();
            let orch = Orch::in_namespace(bin, ns.name(), &state, interfaces);
            lab.hosts.push(Host {
                ns,
                orch,
                etcd: None,
                state,
            });
        }
        for k in 1..=HOSTS {
            lab.start_etcd(k)?;
        }
        lab.wait_for_quorum(Duration::from_secs(20))?;
        for k in 1..=HOSTS {
            let config = lab.config(k, &files(k));
            let host = &mut lab.hosts[k - 1];
            host.orch.write_config(&config)?;
            host.orch.start()?;
        }
        Ok(lab)
    }

    /// Host `k`'s config: its interfaces, the cluster, and `services`.
    pub fn config(&self, k: usize, services: &str) -> String {
        let endpoints: Vec<String> = (1..=HOSTS)
            .map(|m| format!("\"http://{}:2379\"", ctl(m)))
            .collect();
        format!(
            "[dataplane]\ninterfaces = [\"c0\", \"b1\", \"b2\", \"b3\"]\n{}\n\n\
             [cluster]\nendpoints = [{}]\nnode = \"host-{k}\"\naddress = \"{}\"\n\n{services}\n",
            self.dataplane,
            endpoints.join(", "),
            ctl(k)
        )
    }

    pub fn host(&self, k: usize) -> &Host {
        &self.hosts[k - 1]
    }

    pub fn host_mut(&mut self, k: usize) -> &mut Host {
        &mut self.hosts[k - 1]
    }

    /// Starts (or restarts, on its data) etcd member `k` in host `k`'s namespace.
    pub fn start_etcd(&mut self, k: usize) -> io::Result<()> {
        let peers: Vec<String> = (1..=HOSTS)
            .map(|m| format!("m{m}=http://{}:2380", ctl(m)))
            .collect();
        let host = &mut self.hosts[k - 1];
        assert!(host.etcd.is_none(), "etcd m{k} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(host.state.join("etcd.log"))?;
        let ip = ctl(k);
        let child = Command::new("ip")
            .args(["netns", "exec", host.ns.name(), "etcd"])
            .arg(format!("--name=m{k}"))
            .arg(format!("--data-dir={}", host.state.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://{ip}:2379"))
            .arg(format!("--advertise-client-urls=http://{ip}:2379"))
            .arg(format!("--listen-peer-urls=http://{ip}:2380"))
            .arg(format!("--initial-advertise-peer-urls=http://{ip}:2380"))
            .arg(format!("--initial-cluster={}", peers.join(",")))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=orch-test")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting etcd: {e}")))?;
        host.etcd = Some(child);
        Ok(())
    }

    /// Kills etcd member `k` (SIGKILL: no goodbye to its peers).
    pub fn kill_etcd(&mut self, k: usize) {
        if let Some(mut c) = self.hosts[k - 1].etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until etcd commits a write through every running member's endpoint.
    pub fn wait_for_quorum(&self, limit: Duration) -> io::Result<()> {
        let start = Instant::now();
        loop {
            let running: Vec<String> = self
                .hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| h.etcd.is_some())
                .map(|(k, _)| format!("http://{}:2379", ctl(k + 1)))
                .collect();
            let ok = self.hosts[0]
                .ns
                .exec(
                    "etcdctl",
                    &[
                        "--endpoints",
                        &running.join(","),
                        "--command-timeout=1s",
                        "put",
                        "/lab/health",
                        "ok",
                    ],
                )
                .is_ok();
            if ok {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(io::Error::other(format!(
                    "etcd had no quorum within {limit:?}; member 1's log:\n{}",
                    self.etcd_log(1)
                )));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Etcd member `k`'s process id, while it runs.
    pub fn etcd_pid(&self, k: usize) -> Option<u32> {
        self.hosts[k - 1].etcd.as_ref().map(|c| c.id())
    }

    /// What etcd member `k` logged.
    pub fn etcd_log(&self, k: usize) -> String {
        std::fs::read_to_string(self.hosts[k - 1].state.join("etcd.log")).unwrap_or_default()
    }

    /// Every daemon's log, for failure messages.
    pub fn logs(&self) -> String {
        self.hosts
            .iter()
            .enumerate()
            .map(|(k, h)| format!("---- host-{} ----\n{}", k + 1, h.orch.log()))
            .collect()
    }

    /// One connection to `vip` through host `k`, one question: which backend answered.
    pub fn ask_via(&self, k: usize, vip: SocketAddr, line: &str) -> io::Result<String> {
        let line = line.to_owned();
        self.client
            .run(move || connect_from(client_via(k), vip)?.ask(&line))?
    }
}

impl ClusterLab {
    /// Sends the client's traffic from its address for host `k` through host `via`
    /// instead (as an ECMP change would); the backends still answer through host `k`.
    pub fn route_client(&self, k: usize, via: usize) -> io::Result<()> {
        self.client.ip(&[
            "route",
            "replace",
            "default",
            "via",
            &format!("198.18.{}.1", 60 + via),
            "table",
            &(100 + k).to_string(),
        ])?;
        Ok(())
    }

    /// A connection to `vip` through host `k` (the client's socket, usable from any
    /// thread).
    pub fn connect_via(&self, k: usize, vip: SocketAddr) -> io::Result<LineConn> {
        self.client.run(move || connect_from(client_via(k), vip))?
    }
}

/// A connection to `to` from `from` (which picks the host the client goes through).
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> io::Result<LineConn> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(IpAddr::V4(from), 0).into())?;
    socket.connect_timeout(&to.into(), REQUEST_TIMEOUT)?;
    LineConn::from_stream(socket.into())
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            let _ = host.orch.stop();
            if let Some(mut c) = host.etcd.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ =
                nix::mount::umount2(&host.state.join("bpffs"), nix::mount::MntFlags::MNT_DETACH);
        }
        self.stop.store(true, Ordering::Relaxed);
        for t in self.servers.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

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
    /// Where the CA, etcd's and orch's certificates are, when clients speak TLS to etcd.
    tls: Option<PathBuf>,
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
        Self::build(tag, bin, dataplane, false, files)
    }

    /// [`ClusterLab::new`] with etcd's client port on TLS (a CA of the lab's own, client
    /// certificates required) and orch configured with `[cluster.tls]`.
    pub fn with_tls(
        tag: &str,
        bin: &Path,
        files: impl Fn(usize) -> String,
    ) -> io::Result<ClusterLab> {
        Self::build(tag, bin, "", true, files)
    }

    fn build(
        tag: &str,
        bin: &Path,
        dataplane: &str,
        tls: bool,
        files: impl Fn(usize) -> String,
    ) -> io::Result<ClusterLab> {
        netns::sweep_stale(NS_PREFIX);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{}-{n}{tag}-", std::process::id());
        let state = std::env::temp_dir().join(format!("{prefix}state"));
        std::fs::create_dir_all(&state)?;
        let core = Netns::create(&format!("{prefix}core"))?;
        let client = Netns::create(&format!("{prefix}client"))?;
        let tls = if tls {
            Some(make_certificates(&state)?)
        } else {
            None
        };
        let mut lab = ClusterLab {
            dataplane: dataplane.to_owned(),
            tls,
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
            lab.route_client(k, k)?;
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = (1..=HOSTS)
            .map(|m| format!("\"{scheme}://{}:2379\"", ctl(m)))
            .collect();
        let tls = self.tls.as_ref().map_or_else(String::new, |d| {
            format!(
                "[cluster.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n",
                d.join("ca.pem"),
                d.join("orch.pem"),
                d.join("orch.key")
            )
        });
        format!(
            "[dataplane]\ninterfaces = [\"c0\", \"b1\", \"b2\", \"b3\"]\n{}\n\n\
             [cluster]\nendpoints = [{}]\nnode = \"host-{k}\"\naddress = \"{}\"\n\n{tls}{services}\n",
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
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut command = Command::new("ip");
        command.args(["netns", "exec", host.ns.name(), "etcd"]);
        if let Some(dir) = &self.tls {
            command
                .arg(format!("--cert-file={}", dir.join("etcd.pem").display()))
                .arg(format!("--key-file={}", dir.join("etcd.key").display()))
                .arg(format!(
                    "--trusted-ca-file={}",
                    dir.join("ca.pem").display()
                ))
                .arg("--client-cert-auth");
        }
        let child = command
            .arg(format!("--name=m{k}"))
            .arg(format!("--data-dir={}", host.state.join("etcd").display()))
            .arg(format!("--listen-client-urls={scheme}://{ip}:2379"))
            .arg(format!("--advertise-client-urls={scheme}://{ip}:2379"))
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
            let ok = self.etcdctl(&["put", "/lab/health", "ok"]).is_ok();
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

    /// `etcdctl args` against the running members (from host 1's namespace).
    pub fn etcdctl(&self, args: &[&str]) -> io::Result<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> = self
            .hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.etcd.is_some())
            .map(|(k, _)| format!("{scheme}://{}:2379", ctl(k + 1)))
            .collect();
        let mut all = vec![
            format!("--endpoints={}", endpoints.join(",")),
            "--command-timeout=1s".to_owned(),
        ];
        if let Some(dir) = &self.tls {
            for (flag, file) in [
                ("cacert", "ca.pem"),
                ("cert", "orch.pem"),
                ("key", "orch.key"),
            ] {
                all.push(format!("--{flag}={}", dir.join(file).display()));
            }
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.hosts[0].ns.exec("etcdctl", &all)
    }

    /// Compacts etcd's history up to its current revision (as an operator's or etcd's
    /// automatic compaction would): a watch that resumes from before it must list again.
    pub fn compact(&self) -> io::Result<i64> {
        let out = self.etcdctl(&["put", "/lab/compact", "now", "-w", "json"])?;
        let json: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| io::Error::other(format!("etcdctl put answered {out:?}: {e}")))?;
        let revision = json["header"]["revision"]
            .as_i64()
            .ok_or_else(|| io::Error::other(format!("no revision in {out}")))?;
        self.etcdctl(&["compact", &revision.to_string()])?;
        Ok(revision)
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
    connect_from_port(from, 0, to)
}

/// [`connect_from`] from a chosen port (0: any), so that a test can open the same flow
/// again. It closes with a RST (no TIME_WAIT holds the port), after which a SYN of the same
/// flow is balanced afresh.
pub fn connect_from_port(from: Ipv4Addr, port: u16, to: SocketAddr) -> io::Result<LineConn> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_linger(Some(Duration::ZERO))?;
    socket.bind(&SocketAddr::new(IpAddr::V4(from), port).into())?;
    socket.connect_timeout(&to.into(), REQUEST_TIMEOUT)?;
    LineConn::from_stream(socket.into())
}

/// A CA, a server certificate for every member's address and a client certificate for
/// orch (and etcdctl), made with `openssl` in `state/tls`.
fn make_certificates(state: &Path) -> io::Result<PathBuf> {
    let dir = state.join("tls");
    std::fs::create_dir_all(&dir)?;
    let sans: Vec<String> = (1..=HOSTS).map(|k| format!("IP:{}", ctl(k))).collect();
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "subjectAltName={}\nextendedKeyUsage=serverAuth\n",
            sans.join(",")
        ),
    )?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    let openssl = |args: &[&str]| -> io::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("running openssl: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=orch lab CA"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(&ca)?;
    for (name, ext) in [("etcd", "server.ext"), ("orch", "client.ext")] {
        let (key, csr, pem, subject) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("/CN={name}"),
        );
        let mut req = vec!["req", "-subj", &subject];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr]);
        openssl(&req)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            ext,
            "-out",
            &pem,
        ])?;
    }
    Ok(dir)
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

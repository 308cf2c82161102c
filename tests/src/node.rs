//! A real node for the end-to-end suite: containerd (Debian's, with runc and the CNI bridge
//! plugin), and the v1.35 kubelet, kube-controller-manager, kube-scheduler and kube-proxy from
//! `tests/node`, beside a control plane of its own that pods reach. Pods get their images from
//! `images/build.py` (no registry, no daemon) and resolve names with the small cluster DNS of
//! `tests/node` (Services, plus the host names a test adds for its stand-in partners).
//!
//! The node has an address of its own ([`NODE_IP`], on the loopback interface): the API server,
//! the kubelet, the DNS and the tests' partners listen there, and pods reach it through their
//! bridge's gateway. Pods get addresses in [`POD_CIDR`]; Services are in `10.0.0.0/24`.
//!
//! It needs root (it creates interfaces, iptables rules, mounts and cgroups). Everything it
//! starts stops on drop: the pods' containers, the processes, their mounts, the bridge, the
//! iptables rules of kube-proxy and the node's address.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::bins::{operator_bin, sidecar_bin};
use crate::controlplane::ControlPlane;
use crate::process::{Process, Spec};
use crate::tools::{node_bin, progress, target_dir, workspace_root};

/// The node's own address, added to the loopback interface (this machine's kernel has no
/// dummy interfaces): local to the host, and routed to from the pods' bridge.
pub const NODE_IP: &str = "10.250.0.1";
/// The pods' bridge and their addresses.
const POD_BRIDGE: &str = "tgpods0";
pub const POD_CIDR: &str = "10.251.0.0/24";
/// The node's name in the API.
pub const NODE_NAME: &str = "node";
/// The tag of every image the node loads (the chart's appVersion).
pub const IMAGE_TAG: &str = "0.1.0";
/// The app image: curl, and `sleep infinity` as its entrypoint.
pub const CURL_IMAGE: &str = "tollgate.test/curl:0.1.0";

/// A running node and its control plane; everything stops on drop.
pub struct Node {
    // Dropped in this order: the node's processes before the control plane they talk to.
    procs: Vec<Process>,
    containerd: Option<Process>,
    cp: ControlPlane,
    dir: PathBuf,
    logs: PathBuf,
}

/// Runs a command to completion; its stdout, or an error quoting its stderr.
fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What the node needs from the machine, with the package that provides it.
fn check_machine() -> anyhow::Result<()> {
    if sh("id", &["-u"])?.trim() != "0" {
        bail!("a real node needs root (interfaces, iptables, mounts, cgroups)");
    }
    for (what, path, package) in [
        ("containerd", "/usr/bin/containerd", "containerd"),
        ("ctr", "/usr/bin/ctr", "containerd"),
        ("runc", "/usr/sbin/runc", "runc"),
        (
            "the CNI bridge plugin",
            "/usr/lib/cni/bridge",
            "containernetworking-plugins",
        ),
        (
            "the CNI host-local plugin",
            "/usr/lib/cni/host-local",
            "containernetworking-plugins",
        ),
        ("python3", "/usr/bin/python3", "python3"),
    ] {
        if !Path::new(path).exists() {
            bail!("{what} ({path}) is missing: install Debian's {package} package");
        }
    }
    Ok(())
}

impl Node {
    /// Starts a control plane, containerd and the node components, builds and loads the images
    /// (Tollgate's, from the binaries under test, and the test images), and waits until the
    /// node is Ready and schedulable. Progress goes to stderr; logs to `<target>/e2e-logs/node/`.
    pub fn start() -> anyhow::Result<Node> {
        check_machine()?;
        let started = Instant::now();
        let logs = target_dir().join("e2e-logs").join("node");
        fs::create_dir_all(&logs)?;
        // Short: containerd's socket path must fit in a sockaddr_un.
        let dir = std::env::temp_dir().join(format!("tollgate-node-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        setup_node_address()?;

        let cp = ControlPlane::start_with(
            &logs.join("controlplane.log"),
            &["--node-ip", NODE_IP],
            // exec and logs: the API server dials the kubelet at the node's address.
            &["--kubelet-preferred-address-types=InternalIP"],
        )?;
        let pki = cp
            .kubeconfig()
            .parent()
            .context("the kubeconfig has a directory")?
            .join("pki");
        let mut node = Node {
            procs: Vec::new(),
            containerd: None,
            cp,
            dir: dir.clone(),
            logs: logs.clone(),
        };

        node.start_containerd()?;
        node.load_images()?;

        let bin = node_bin();
        let kubeconfig = node.cp.kubeconfig().display().to_string();
        let ca = pki.join("ca.crt").display().to_string();
        let kubelet_config = dir.join("kubelet.yaml");
        fs::write(dir.join("resolv.conf"), "")?;
        fs::write(
            &kubelet_config,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# The API server calls the kubelet (exec, logs) without a client certificate.
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
# This machine has cgroup v1, which v1.35 supports only when told to.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
# No QoS hierarchy and no node allocatable enforcement: the kubelet runs inside a cgroup it
# does not own. Containers still get their own cgroups and limits from runc.
cgroupsPerQOS: false
enforceNodeAllocatable: []
containerRuntimeEndpoint: unix://{dir}/containerd.sock
clusterDNS: [{NODE_IP}]
clusterDomain: cluster.local
resolvConf: {dir}/resolv.conf
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzPort: 0
# A test machine's disk may be nearly full: never evict or collect the loaded images.
evictionHard: {{memory.available: "1Mi", nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
podLogsDir: {dir}/pod-logs
"#,
                dir = dir.display()
            ),
        )?;
        let dns_host = format!("--listen={NODE_IP}:53");
        let proxy_healthz = format!("--healthz-bind-address=127.0.0.1:{}", free_port()?);
        let proxy_metrics = format!("--metrics-bind-address=127.0.0.1:{}", free_port()?);
        let root_dir = dir.join("kubelet").display().to_string();
        let cert_dir = dir.join("kubelet-pki").display().to_string();
        let components: Vec<(&str, Vec<String>)> = vec![
            (
                "dns",
                vec![
                    "dns".into(),
                    format!("--kubeconfig={kubeconfig}"),
                    dns_host,
                ],
            ),
            (
                "kube-proxy",
                vec![
                    "kube-proxy".into(),
                    format!("--kubeconfig={kubeconfig}"),
                    format!("--hostname-override={NODE_NAME}"),
                    "--proxy-mode=iptables".into(),
                    format!("--cluster-cidr={POD_CIDR}"),
                    // Every Service connection is masqueraded, so a pod calling a Service
                    // backed by a pod on the same bridge gets its answer back the same way.
                    "--masquerade-all".into(),
                    "--conntrack-max-per-core=0".into(),
                    "--nodeport-addresses=primary".into(),
                    proxy_healthz,
                    proxy_metrics,
                ],
            ),
            (
                "controller-manager",
                vec![
                    "controller-manager".into(),
                    format!("--kubeconfig={kubeconfig}"),
                    "--leader-elect=false".into(),
                    "--secure-port=0".into(),
                    format!("--root-ca-file={ca}"),
                    "--controllers=*,-nodeipam,-cloud-node-lifecycle,-route,-service,-persistentvolume-binder,-attachdetach".into(),
                ],
            ),
            (
                "scheduler",
                vec![
                    "scheduler".into(),
                    format!("--kubeconfig={kubeconfig}"),
                    "--leader-elect=false".into(),
                    "--secure-port=0".into(),
                ],
            ),
            (
                "kubelet",
                vec![
                    "kubelet".into(),
                    format!("--config={}", kubelet_config.display()),
                    format!("--kubeconfig={kubeconfig}"),
                    format!("--root-dir={root_dir}"),
                    format!("--cert-dir={cert_dir}"),
                    format!("--hostname-override={NODE_NAME}"),
                    format!("--node-ip={NODE_IP}"),
                ],
            ),
        ];
        for (name, args) in components {
            let mut spec = Spec::new(bin);
            spec.args(args);
            let process = Process::spawn(name, &spec, &logs.join(format!("{name}.log")))?;
            node.procs.push(process);
        }
        node.wait_ready(Duration::from_secs(120))?;
        progress(&format!(
            "node {NODE_NAME} ({NODE_IP}) ready in {:.1?} (logs: {})",
            started.elapsed(),
            logs.display()
        ));
        Ok(node)
    }

    /// The node's own control plane.
    pub fn cp(&self) -> &ControlPlane {
        &self.cp
    }

    /// Where a pod's container logs are: `<dir>/pod-logs/<ns>_<pod>_<uid>/<container>/0.log`.
    pub fn pod_logs(&self) -> PathBuf {
        self.dir.join("pod-logs")
    }

    /// Restarts the cluster DNS with extra `--host NAME=IP` answers (a partner's host name).
    pub fn add_hosts(&mut self, hosts: &[(&str, &str)]) -> anyhow::Result<()> {
        let i = self
            .procs
            .iter()
            .position(|p| p.name() == "dns")
            .context("the DNS runs")?;
        self.procs[i].kill();
        let mut spec = Spec::new(node_bin());
        spec.args([
            "dns".to_string(),
            format!("--kubeconfig={}", self.cp.kubeconfig().display()),
            format!("--listen={NODE_IP}:53"),
        ]);
        for (name, ip) in hosts {
            spec.arg(format!("--host={name}={ip}"));
        }
        let mut dns = Process::spawn("dns", &spec, &self.logs.join("dns.log"))?;
        dns.wait_for_line(Duration::from_secs(30), |l| {
            l.contains("dns: answering").then_some(())
        })?;
        self.procs[i] = dns;
        Ok(())
    }

    fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let address = self.dir.join("containerd.sock").display().to_string();
        let mut all = vec!["-a", &address, "-n", "k8s.io"];
        all.extend_from_slice(args);
        sh("ctr", &all)
    }

    fn start_containerd(&mut self) -> anyhow::Result<()> {
        let d = self.dir.display();
        let config = self.dir.join("containerd.toml");
        let cni = self.dir.join("cni");
        fs::create_dir_all(&cni)?;
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "tollgate.test/pause:{IMAGE_TAG}"
  # The test process may not lower a child's OOM score below its own.
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#
            ),
        )?;
        fs::write(
            cni.join("10-tollgate.conflist"),
            format!(
                r#"{{"cniVersion": "0.4.0", "name": "tollgate-e2e", "plugins": [
  {{"type": "bridge", "bridge": "{POD_BRIDGE}", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{POD_CIDR}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{d}/cni-ipam"}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
]}}
"#
            ),
        )?;
        let mut spec = Spec::new(Path::new("/usr/bin/containerd"));
        spec.arg("--config").arg(&config);
        let mut containerd =
            Process::spawn("containerd", &spec, &self.logs.join("containerd.log"))?;
        containerd.wait_for_line(Duration::from_secs(60), |l| {
            l.contains("containerd successfully booted").then_some(())
        })?;
        self.containerd = Some(containerd);
        Ok(())
    }

    /// Builds every image with `images/build.py` from the binaries under test and imports them.
    fn load_images(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let out = self.dir.join("images");
        let script = workspace_root().join("images/build.py");
        let operator = operator_bin().display().to_string();
        let sidecar = sidecar_bin().display().to_string();
        progress(&format!("building images with {}", script.display()));
        sh(
            "python3",
            &[
                &script.display().to_string(),
                "--out",
                &out.display().to_string(),
                "--operator",
                &operator,
                "--sidecar",
                &sidecar,
                "--version",
                IMAGE_TAG,
                "--with-test-images",
            ],
        )?;
        for entry in fs::read_dir(&out)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tar") {
                self.ctr(&["images", "import", &path.display().to_string()])?;
                let _ = fs::remove_file(&path);
            }
        }
        progress(&format!(
            "images built and loaded in {:.1?}: {}",
            started.elapsed(),
            self.ctr(&["images", "ls", "-q"])?
                .lines()
                .filter(|l| !l.starts_with("sha256:"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        Ok(())
    }

    fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ready = self
                .cp
                .kubectl([
                    "get",
                    "node",
                    NODE_NAME,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.spec.taints}",
                ])
                .unwrap_or_default();
            if ready.trim() == "True" {
                return Ok(());
            }
            for p in &mut self.procs {
                if let Some(status) = p.exited() {
                    bail!("{} exited ({status}); {}", p.name(), p.tail());
                }
            }
            if Instant::now() > deadline {
                let kubelet = self.procs.iter().find(|p| p.name() == "kubelet");
                bail!(
                    "node {NODE_NAME} not Ready and schedulable within {within:?} ({ready:?}); {}",
                    kubelet.map(Process::tail).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// [`NODE_IP`] on the loopback interface; kept if a previous run left it.
fn setup_node_address() -> anyhow::Result<()> {
    let have = sh("ip", &["-4", "-o", "addr", "show", "dev", "lo"])?;
    if !have.contains(&format!(" {NODE_IP}/32 ")) {
        sh(
            "ip",
            &["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"],
        )?;
    }
    Ok(())
}

impl Drop for Node {
    fn drop(&mut self) {
        // Nothing may start pods any more; then the kubelet stops every pod the way a node
        // drains (containers killed, the CNI plugin releases each pod's address, rules and
        // network namespace), so the machine is left as it was.
        for p in self
            .procs
            .iter_mut()
            .filter(|p| ["controller-manager", "scheduler"].contains(&p.name()))
        {
            p.kill();
        }
        let _ = self.cp.kubectl([
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=1",
            "--wait=false",
        ]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline
            && self
                .ctr(&["tasks", "ls", "-q"])
                .is_ok_and(|t| !t.trim().is_empty())
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        for p in self.procs.iter_mut().rev() {
            p.kill();
        }
        // Whatever did not stop in time.
        if let Ok(tasks) = self.ctr(&["tasks", "ls", "-q"]) {
            for id in tasks.lines().filter(|l| !l.is_empty()) {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
            }
        }
        if let Some(mut containerd) = self.containerd.take() {
            containerd.kill();
        }
        // The shims outlive containerd; theirs name its socket.
        let socket = self.dir.join("containerd.sock").display().to_string();
        let _ = sh("pkill", &["-KILL", "-f", &socket]);
        // Mounts under the node's directory (rootfs overlays, volumes, sandbox /dev/shm),
        // deepest first.
        if let Ok(mounts) = fs::read_to_string("/proc/mounts") {
            let prefix = self.dir.display().to_string();
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&prefix))
                .collect();
            points.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in points {
                let _ = sh("umount", &["-l", m]);
            }
        }
        remove_pod_masquerade_rules();
        remove_kubelet_rules();
        let _ = sh(
            &node_bin().display().to_string(),
            &["kube-proxy", "--cleanup"],
        );
        let _ = sh("ip", &["link", "del", POD_BRIDGE]);
        let _ = sh(
            "ip",
            &["addr", "del", &format!("{NODE_IP}/32"), "dev", "lo"],
        );
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The kubelet's own chains: KUBE-FIREWALL (drops packets to 127.0.0.0/8 from other
/// sources, hooked into INPUT and OUTPUT) and the canaries it watches for a flush.
fn remove_kubelet_rules() {
    for iptables in ["iptables", "ip6tables"] {
        for hook in ["INPUT", "OUTPUT"] {
            while sh(iptables, &["-D", hook, "-j", "KUBE-FIREWALL"]).is_ok() {}
        }
        for (table, chain) in [
            ("filter", "KUBE-FIREWALL"),
            ("filter", "KUBE-KUBELET-CANARY"),
            ("nat", "KUBE-KUBELET-CANARY"),
            ("mangle", "KUBE-KUBELET-CANARY"),
            ("mangle", "KUBE-IPTABLES-HINT"),
        ] {
            let _ = sh(iptables, &["-t", table, "-F", chain]);
            let _ = sh(iptables, &["-t", table, "-X", chain]);
        }
    }
}

/// The bridge plugin's masquerade rules of pods that were never torn down (a killed run):
/// one POSTROUTING rule and one chain per pod, marked with the network's name; and the pods'
/// network namespaces that no process holds any more.
fn remove_pod_masquerade_rules() {
    const MARK: &str = "\"tollgate-e2e\"";
    if let Ok(rules) = sh(
        "iptables",
        &["-t", "nat", "-L", "POSTROUTING", "-n", "--line-numbers"],
    ) {
        let mut numbers: Vec<u32> = rules
            .lines()
            .filter(|r| r.contains(MARK))
            .filter_map(|r| r.split_whitespace().next()?.parse().ok())
            .collect();
        numbers.sort_unstable_by(|a, b| b.cmp(a));
        for n in numbers {
            let _ = sh(
                "iptables",
                &["-t", "nat", "-D", "POSTROUTING", &n.to_string()],
            );
        }
    }
    if let Ok(all) = sh("iptables", &["-t", "nat", "-S"]) {
        let mut chains: Vec<&str> = all
            .lines()
            .filter(|r| r.starts_with("-A CNI-") && r.contains(MARK))
            .filter_map(|r| r.split_whitespace().nth(1))
            .collect();
        chains.dedup();
        for chain in chains {
            let _ = sh("iptables", &["-t", "nat", "-F", chain]);
            let _ = sh("iptables", &["-t", "nat", "-X", chain]);
        }
    }
    if let Ok(namespaces) = fs::read_dir("/var/run/netns") {
        for ns in namespaces.flatten() {
            let name = ns.file_name().to_string_lossy().into_owned();
            if name.starts_with("cni-")
                && sh("ip", &["netns", "pids", &name]).is_ok_and(|p| p.trim().is_empty())
            {
                let _ = sh("ip", &["netns", "del", &name]);
            }
        }
    }
}

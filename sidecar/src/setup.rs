//! `tollgate-sidecar setup-iptables`: the pod's redirect rules, installed by the injected init
//! container (the only container with NET_ADMIN) before the app starts.
//!
//! In the nat table of the current network namespace, two chains of our own, rewritten whole on
//! every run, and one jump from `OUTPUT`, added only when missing, so running it again changes
//! nothing:
//!
//! ```text
//! -A OUTPUT -p tcp -j TOLLGATE_OUTPUT
//! -A TOLLGATE_OUTPUT -o lo -j RETURN                          loopback (incl. the pod's own IPs)
//! -A TOLLGATE_OUTPUT -d 127.0.0.0/8 -j RETURN
//! -A TOLLGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN     the sidecar's own connections
//! -A TOLLGATE_OUTPUT -d <excluded CIDR> -j RETURN            e.g. the operator, the API server
//! -A TOLLGATE_OUTPUT -p tcp -m multiport --dports 80,443 -j TOLLGATE_REDIRECT
//! -A TOLLGATE_REDIRECT -p tcp -j REDIRECT --to-ports 15001
//! ```

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode, Stdio};
use std::str::FromStr;

/// The chain `OUTPUT` jumps to.
pub const OUTPUT_CHAIN: &str = "TOLLGATE_OUTPUT";
/// The chain that redirects to the transparent listener.
pub const REDIRECT_CHAIN: &str = "TOLLGATE_REDIRECT";
/// `multiport` takes at most 15 ports per rule.
const MULTIPORT_MAX: usize = 15;
/// Seconds to wait for the xtables lock.
const LOCK_WAIT: &str = "10";

/// Sub-commands of `tollgate-sidecar`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Install the nat rules that redirect the app's outbound TCP to the transparent listener,
    /// in the current network namespace (needs NET_ADMIN). Idempotent.
    SetupIptables(IptablesArgs),
}

impl Command {
    pub fn run(self) -> ExitCode {
        match self {
            Command::SetupIptables(args) => match setup_iptables(&args, &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate-sidecar setup-iptables: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    }
}

/// What to redirect, where to, and what never to touch.
#[derive(Debug, Clone, clap::Args)]
pub struct IptablesArgs {
    /// Port of the sidecar's `--transparent` listener.
    #[arg(long, default_value_t = 15001)]
    pub listener_port: u16,
    /// UID the sidecar runs as: its own connections (to partners, to original destinations,
    /// to the operator) are never redirected. Must not be 0.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Also exempt connections made by this GID.
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Destination TCP ports redirected (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "80,443")]
    pub ports: Vec<u16>,
    /// Destinations never redirected: CIDRs or addresses, comma-separated (the operator
    /// channel, the API server, a metadata service). IPv6 ones need `--ipv6`.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub exclude_cidrs: Vec<Cidr>,
    /// Also redirect IPv6 (ip6tables); the sidecar must then listen on `[::1]:<listener-port>`
    /// too.
    #[arg(long)]
    pub ipv6: bool,
    /// Which iptables to drive: `auto` uses the one that already holds rules in this
    /// namespace, else nft when the kernel has it, else legacy.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// Print the rules and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// An iptables backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Auto,
    Nft,
    Legacy,
}

/// An address range, `10.96.0.0/12` or `2001:db8::/32`; a bare address is a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (e.g. 10.96.0.0/12, 2001:db8::/32)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// IPv4 (iptables) or IPv6 (ip6tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
    fn prefix(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// Why the rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "{wanted} not found on PATH ({path}): setup-iptables runs the iptables tools; install the \
         `iptables` package (Debian/Ubuntu/Alpine) in the image that runs it"
    )]
    MissingBinary { wanted: String, path: String },
    #[error(
        "no usable {family} iptables backend in this network namespace (it needs root with \
         NET_ADMIN, and NET_RAW for the legacy backend): {tried}"
    )]
    NoUsableBackend { family: &'static str, tried: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

/// Checks the arguments; the errors name the flag.
pub fn validate(args: &IptablesArgs) -> Result<(), SetupError> {
    let bad = |m: String| Err(SetupError::Invalid(m));
    if args.proxy_uid == 0 {
        return bad("--proxy-uid 0: the sidecar must not run as root, or every root process in the pod would escape interception".into());
    }
    if args.listener_port == 0 {
        return bad("--listener-port must not be 0".into());
    }
    if args.ports.is_empty() || args.ports.contains(&0) {
        return bad("--ports needs one or more ports in 1..=65535".into());
    }
    if !args.ipv6
        && let Some(c) = args.exclude_cidrs.iter().find(|c| c.addr.is_ipv6())
    {
        return bad(format!("--exclude-cidrs {c} is IPv6: add --ipv6"));
    }
    Ok(())
}

/// The `iptables-restore --noflush` input for `family`: declaring our chains empties them, so
/// the rules below replace whatever an earlier run installed.
pub fn restore_input(args: &IptablesArgs, family: Family) -> String {
    let mut out = String::from("*nat\n");
    out.push_str(&format!(
        ":{OUTPUT_CHAIN} - [0:0]\n:{REDIRECT_CHAIN} - [0:0]\n"
    ));
    out.push_str(&format!(
        "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}\n",
        args.listener_port
    ));
    out.push_str(&format!("-A {OUTPUT_CHAIN} -o lo -j RETURN\n"));
    out.push_str(&format!(
        "-A {OUTPUT_CHAIN} -d {} -j RETURN\n",
        family.loopback()
    ));
    out.push_str(&format!(
        "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN\n",
        args.proxy_uid
    ));
    if let Some(gid) = args.proxy_gid {
        out.push_str(&format!(
            "-A {OUTPUT_CHAIN} -m owner --gid-owner {gid} -j RETURN\n"
        ));
    }
    for c in &args.exclude_cidrs {
        if c.addr.is_ipv4() == (family == Family::V4) {
            out.push_str(&format!("-A {OUTPUT_CHAIN} -d {c} -j RETURN\n"));
        }
    }
    let mut ports = args.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    for group in ports.chunks(MULTIPORT_MAX) {
        let list = group
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        out.push_str(&format!(
            "-A {OUTPUT_CHAIN} -p tcp -m multiport --dports {list} -j {REDIRECT_CHAIN}\n"
        ));
    }
    out.push_str("COMMIT\n");
    out
}

/// The jump from `OUTPUT` into our chain (added once).
pub fn jump_rule() -> [&'static str; 4] {
    ["-p", "tcp", "-j", OUTPUT_CHAIN]
}

/// Installs (or, with `--dry-run`, prints) the rules; reports to `out`.
pub fn setup_iptables(args: &IptablesArgs, out: &mut dyn Write) -> Result<(), SetupError> {
    validate(args)?;
    let families: &[Family] = if args.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for &family in families {
        let rules = restore_input(args, family);
        let p = family.prefix();
        if args.dry_run {
            let _ = writeln!(
                out,
                "# {}: {p}-restore --noflush\n{rules}# then, unless present: {p} -t nat -A OUTPUT {}",
                family.name(),
                jump_rule().join(" ")
            );
            continue;
        }
        let tools = Tools::choose(family, args.backend)?;
        tools.install(&rules)?;
        let installed = tools.run(&["-t", "nat", "-S", OUTPUT_CHAIN])?;
        let _ = writeln!(
            out,
            "{} rules installed with {} ({}):\n{installed}",
            family.name(),
            tools.iptables.display(),
            tools.backend
        );
    }
    Ok(())
}

// === impl Tools ===

/// The binaries of one backend and family.
#[derive(Debug)]
struct Tools {
    backend: &'static str,
    iptables: PathBuf,
    restore: PathBuf,
}

impl Tools {
    /// Picks the backend: the one asked for, else the one already holding nat rules here,
    /// else the first that works (nft, then legacy, then whatever plain `iptables` is).
    fn choose(family: Family, wanted: Backend) -> Result<Tools, SetupError> {
        let p = family.prefix();
        let named = |backend: &'static str| {
            Some(Tools {
                backend,
                iptables: which(&format!("{p}-{backend}"))?,
                restore: which(&format!("{p}-{backend}-restore"))?,
            })
        };
        let candidates: Vec<Tools> = match wanted {
            Backend::Nft => named("nft").into_iter().collect(),
            Backend::Legacy => named("legacy").into_iter().collect(),
            Backend::Auto => {
                let mut c: Vec<Tools> = ["nft", "legacy"].into_iter().filter_map(named).collect();
                if c.is_empty()
                    && let (Some(i), Some(r)) = (which(p), which(&format!("{p}-restore")))
                {
                    c.push(Tools {
                        backend: "default",
                        iptables: i,
                        restore: r,
                    });
                }
                c
            }
        };
        if candidates.is_empty() {
            let wanted = match wanted {
                Backend::Auto => format!("{p}-restore and {p} (or their -nft/-legacy variants)"),
                Backend::Nft => format!("{p}-nft and {p}-nft-restore"),
                Backend::Legacy => format!("{p}-legacy and {p}-legacy-restore"),
            };
            return Err(SetupError::MissingBinary {
                wanted,
                path: std::env::var("PATH").unwrap_or_default(),
            });
        }
        let mut tried = Vec::new();
        let mut usable: Vec<(usize, Tools)> = Vec::new();
        for t in candidates {
            match t.run(&["-t", "nat", "-S"]) {
                Ok(listing) => {
                    let rules = listing.lines().filter(|l| l.starts_with("-A ")).count();
                    usable.push((rules, t));
                }
                Err(e) => tried.push(format!("{}: {e}", t.backend)),
            }
        }
        // The backend already in use wins (mixing both works but confuses whoever debugs it);
        // on a tie, the earlier candidate.
        let best = usable
            .iter()
            .enumerate()
            .max_by_key(|(i, (rules, _))| (*rules, std::cmp::Reverse(*i)))
            .map(|(i, _)| i);
        match best {
            Some(i) => Ok(usable.swap_remove(i).1),
            None => Err(SetupError::NoUsableBackend {
                family: family.name(),
                tried: tried.join("; "),
            }),
        }
    }

    fn install(&self, rules: &str) -> Result<(), SetupError> {
        let wait = format!("--wait={LOCK_WAIT}");
        let args = ["--noflush", wait.as_str()];
        let command = format!("{} {}", self.restore.display(), args.join(" "));
        let mut child = Process::new(&self.restore)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SetupError::Spawn {
                command: command.clone(),
                source,
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(rules.as_bytes())
                .map_err(|source| SetupError::Spawn {
                    command: command.clone(),
                    source,
                })?;
        }
        let output = child
            .wait_with_output()
            .map_err(|source| SetupError::Spawn {
                command: command.clone(),
                source,
            })?;
        check(&command, &output)?;
        let jump = jump_rule();
        let check_args: Vec<&str> = ["-t", "nat", "-C", "OUTPUT"]
            .into_iter()
            .chain(jump)
            .collect();
        if self.run(&check_args).is_err() {
            let add: Vec<&str> = ["-t", "nat", "-A", "OUTPUT"]
                .into_iter()
                .chain(jump)
                .collect();
            self.run(&add)?;
        }
        Ok(())
    }

    /// Runs the iptables binary; its stdout on success.
    fn run(&self, args: &[&str]) -> Result<String, SetupError> {
        let mut all = vec!["-w", LOCK_WAIT];
        all.extend_from_slice(args);
        let command = format!("{} {}", self.iptables.display(), all.join(" "));
        let output = Process::new(&self.iptables)
            .args(&all)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| SetupError::Spawn {
                command: command.clone(),
                source,
            })?;
        check(&command, &output)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

fn check(command: &str, output: &std::process::Output) -> Result<(), SetupError> {
    if output.status.success() {
        return Ok(());
    }
    Err(SetupError::Failed {
        command: command.to_string(),
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// `name` on `PATH`, as a shell would find it.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    fn parse(args: &[&str]) -> IptablesArgs {
        let mut all = vec!["x", "setup-iptables"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).unwrap().command {
            Command::SetupIptables(a) => a,
        }
    }

    #[test]
    fn default_rules_redirect_80_and_443_and_exempt_loopback_and_the_proxy() {
        let args = parse(&[]);
        validate(&args).unwrap();
        assert_eq!(
            restore_input(&args, Family::V4),
            "*nat\n\
             :TOLLGATE_OUTPUT - [0:0]\n\
             :TOLLGATE_REDIRECT - [0:0]\n\
             -A TOLLGATE_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
             -A TOLLGATE_OUTPUT -o lo -j RETURN\n\
             -A TOLLGATE_OUTPUT -d 127.0.0.0/8 -j RETURN\n\
             -A TOLLGATE_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
             -A TOLLGATE_OUTPUT -p tcp -m multiport --dports 80,443 -j TOLLGATE_REDIRECT\n\
             COMMIT\n"
        );
    }

    #[test]
    fn exclusions_ports_and_families() {
        let args = parse(&[
            "--listener-port",
            "15006",
            "--proxy-uid",
            "999",
            "--proxy-gid",
            "998",
            "--ports",
            "8080,80",
            "--exclude-cidrs",
            "10.96.0.1,192.168.0.0/16,2001:db8::/32",
            "--ipv6",
        ]);
        validate(&args).unwrap();
        let v4 = restore_input(&args, Family::V4);
        assert!(v4.contains("--to-ports 15006\n"));
        assert!(v4.contains("--uid-owner 999 -j RETURN\n"));
        assert!(v4.contains("--gid-owner 998 -j RETURN\n"));
        assert!(v4.contains("-d 10.96.0.1/32 -j RETURN\n"));
        assert!(v4.contains("-d 192.168.0.0/16 -j RETURN\n"));
        assert!(!v4.contains("2001:db8"));
        assert!(v4.contains("--dports 80,8080 -j"));
        let v6 = restore_input(&args, Family::V6);
        assert!(v6.contains("-d ::1/128 -j RETURN\n"));
        assert!(v6.contains("-d 2001:db8::/32 -j RETURN\n"));
        assert!(!v6.contains("10.96.0.1"));
    }

    #[test]
    fn more_than_fifteen_ports_take_several_rules() {
        let ports: Vec<String> = (1000..1020).map(|p| p.to_string()).collect();
        let args = parse(&["--ports", &ports.join(",")]);
        let rules = restore_input(&args, Family::V4);
        assert_eq!(rules.matches("-m multiport").count(), 2);
    }

    #[test]
    fn bad_arguments_name_the_flag() {
        for (args, flag) in [
            (vec!["--proxy-uid", "0"], "--proxy-uid"),
            (vec!["--ports", "0"], "--ports"),
            (vec!["--exclude-cidrs", "2001:db8::/32"], "--ipv6"),
        ] {
            let e = validate(&parse(&args)).unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
        let mut all = vec!["x", "setup-iptables", "--exclude-cidrs", "10.0.0.0/33"];
        assert!(Cli::try_parse_from(&all).is_err());
        all[3] = "not-an-ip";
        assert!(Cli::try_parse_from(&all).is_err());
    }

    #[test]
    fn dry_run_prints_what_it_would_install() {
        let args = parse(&["--dry-run", "--ipv6"]);
        let mut out = Vec::new();
        setup_iptables(&args, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("# IPv4: iptables-restore --noflush\n*nat\n"));
        assert!(out.contains("# IPv6: ip6tables-restore --noflush\n*nat\n"));
        assert!(out.contains("ip6tables -t nat -A OUTPUT -p tcp -j TOLLGATE_OUTPUT"));
    }
}

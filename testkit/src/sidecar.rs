//! The sidecar binary as a child process: its ready line, and starting one and waiting for it.
//! Each suite builds the command line it needs (the binary's path is known only to the
//! sidecar's own tests, `CARGO_BIN_EXE_tollgate-sidecar`, or found by the e2e harness).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The message of the line the sidecar logs once it serves.
pub const READY_MESSAGE: &str = "tollgate-sidecar ready";

/// `(listen, admin)` when `line` is the sidecar's ready line (`--log-format json`).
pub fn ready_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let f = &v["fields"];
    if f["message"] != READY_MESSAGE {
        return None;
    }
    let listen = f["listen"].as_str()?.parse().ok()?;
    let admin = f["admin"].as_str()?.parse().ok()?;
    Some((listen, admin))
}

/// The lines a child printed, kept in memory (clones share them).
#[derive(Clone, Debug, Default)]
pub struct Logs(Arc<Mutex<Vec<String>>>);

impl Logs {
    /// Every line so far, joined with newlines.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn push(&self, line: String) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
}

/// A sidecar that printed its ready line. Its child is killed on drop when the command said
/// `kill_on_drop(true)`.
pub struct Started {
    pub child: Child,
    /// The outbound proxy listener.
    pub listen: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// Its stderr, line by line (the log).
    pub logs: Logs,
}

/// Spawns `cmd` (a sidecar logging JSON) with its stderr piped, keeps every stderr line, and
/// waits up to `within` for the ready line; panics with the log when it does not come.
pub async fn start(cmd: &mut Command, within: Duration) -> Started {
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .expect("the sidecar binary starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let logs = Logs::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let l = logs.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(addrs) = ready_addrs(&line) {
                let _ = tx.send(addrs);
            }
            l.push(line);
        }
    });
    match tokio::time::timeout(within, rx.recv()).await {
        Ok(Some((listen, admin))) => Started {
            child,
            listen,
            admin,
            logs,
        },
        _ => panic!(
            "the sidecar did not become ready within {within:?}; its log:\n{}",
            logs.text()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::ready_addrs;

    #[test]
    fn only_the_ready_line_gives_addresses() {
        let ready = r#"{"fields":{"message":"tollgate-sidecar ready","listen":"127.0.0.1:1","admin":"127.0.0.1:2"}}"#;
        assert_eq!(
            ready_addrs(ready),
            Some((
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap()
            ))
        );
        assert_eq!(ready_addrs(r#"{"fields":{"message":"other"}}"#), None);
        assert_eq!(ready_addrs("not json"), None);
    }
}

//! A child process whose output is kept: appended to a log file that outlives the test (for
//! post-mortems) and held in memory, so tests can wait for a line and quote the log when they
//! fail. Killed on drop.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How many lines of a log an error quotes.
const TAIL_LINES: usize = 60;

/// What to run: the program, its arguments and extra environment, so a stopped process can be
/// started again exactly as before.
#[derive(Clone, Debug)]
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

impl Spec {
    pub fn new(program: &Path) -> Spec {
        Spec {
            program: program.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn arg(&mut self, arg: impl Into<OsString>) -> &mut Spec {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Spec
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> &mut Spec {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running child; stdout and stderr both go to its log.
pub struct Process {
    name: String,
    child: Child,
    log_path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `spec`, appending its output to `log_path` (created with its directory). `name`
    /// labels it in messages and in the log.
    pub fn spawn(name: &str, spec: &Spec, log_path: &Path) -> anyhow::Result<Process> {
        if let Some(dir) = log_path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let log = Arc::new(Mutex::new(log));
        let _ = writeln!(
            log.lock().unwrap_or_else(|e| e.into_inner()),
            "=== {name}: {} {:?}",
            spec.program.display(),
            spec.args
        );
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {}", spec.program.display()))?;
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        for out in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let (lines, log) = (lines.clone(), log.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log.lock().unwrap_or_else(|e| e.into_inner()), "{line}");
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        Ok(Process {
            name: name.to_string(),
            child,
            log_path: log_path.to_path_buf(),
            lines,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many printed lines satisfy `pred`.
    pub fn count_lines(&self, pred: impl Fn(&str) -> bool) -> usize {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().filter(|l| pred(l)).count()
    }

    /// The last lines printed, for error messages.
    pub fn tail(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let from = lines.len().saturating_sub(TAIL_LINES);
        format!(
            "last lines of {} ({}):\n{}",
            self.name,
            self.log_path.display(),
            lines[from..].join("\n")
        )
    }

    /// Whether it has exited, and how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until some line satisfies `find` (which returns what it extracts from it), the
    /// process exits, or `within` passes.
    pub fn wait_for_line<T>(
        &mut self,
        within: Duration,
        find: impl Fn(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + within;
        let mut seen = 0;
        loop {
            {
                let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(found) = lines[seen..].iter().find_map(|l| find(l)) {
                    return Ok(found);
                }
                seen = lines.len();
            }
            if let Some(status) = self.exited() {
                // Let the reader threads drain what it printed last.
                std::thread::sleep(Duration::from_millis(100));
                bail!("{} exited ({status}); {}", self.name, self.tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not get ready within {within:?}; {}",
                    self.name,
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash or an evicted pod: no draining, no goodbye on any socket.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

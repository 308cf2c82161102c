//! `tollgate-sidecar`: the per-pod policy proxy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use tollgate_crds::duration::flag as duration_arg;
use tollgate_sidecar::admin::{self, Admin};
use tollgate_sidecar::cluster::{ClusterClient, ClusterConfig};
use tollgate_sidecar::config::Store;
use tollgate_sidecar::config::file::FileSource;
use tollgate_sidecar::config::operator::OperatorSource;
use tollgate_sidecar::config::secrets::SecretsDir;
use tollgate_sidecar::layers::{self, StackContext};
use tollgate_sidecar::proxy::handler::Proxy;
use tollgate_sidecar::proxy::{ProxyOptions, UnknownHosts, server};
use tollgate_sidecar::state::StateContext;
use tollgate_sidecar::telemetry::metrics::Metrics;
use tollgate_sidecar::telemetry::subscriber::{self as telemetry, LogFormat};
use tollgate_sidecar::{client, intercept, setup, transparent};

/// Governs this pod's outbound calls to partner APIs.
#[derive(Debug, Parser)]
#[command(name = "tollgate-sidecar", version, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<setup::Command>,
    /// Standalone mode: a YAML stream of PartnerIntegration manifests, watched and reloaded.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Cluster mode: the operator's distribution endpoint (`https://host:port`).
    #[arg(long, value_name = "URL", conflicts_with_all = ["config", "secrets_dir"])]
    operator: Option<String>,
    /// Cluster mode: the pod's projected ServiceAccount token (audience `tollgate`), re-read on
    /// every connect.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/secrets/tollgate/token"
    )]
    token_file: PathBuf,
    /// Cluster mode: the CA bundle (PEM) that signs the operator's certificate.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/var/run/secrets/tollgate/ca.crt"
    )]
    operator_ca: PathBuf,
    /// Cluster mode: TLS name to verify on the operator's certificate, if not the URL's host.
    #[arg(long, value_name = "NAME")]
    operator_server_name: Option<String>,
    /// Cluster mode: the pod's labels as the downward API projects them (`metadata.labels`);
    /// when they change the sidecar subscribes again, so the operator selects integrations by
    /// the new labels. Without it a relabelled pod keeps its integrations until it reconnects.
    #[arg(long, value_name = "PATH")]
    labels_file: Option<PathBuf>,
    /// Cluster mode: this pod's name (the downward API sets it).
    #[arg(long, env = "POD_NAME", default_value = "")]
    pod_name: String,
    /// Cluster mode: this pod's namespace (the downward API sets it).
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pod_namespace: String,
    /// Cluster mode: where the last good revision is kept (mode 0600), enforced at start and
    /// while the operator is unreachable.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/lib/tollgate/snapshot.json"
    )]
    state_file: PathBuf,
    /// Where `secretRef`s resolve in standalone mode: DIR/<secret name>/<key>.
    #[arg(long, value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// Outbound listener (forward proxy, Host-routed origin-form, CONNECT).
    #[arg(long, default_value = "127.0.0.1:15080")]
    listen: SocketAddr,
    /// Admin listener (/metrics, /healthz, /readyz, /startupz, /config). `/config` answers
    /// loopback peers only, whatever the address.
    #[arg(long, default_value = "127.0.0.1:15090")]
    admin: SocketAddr,
    /// `/startupz` reports started after this long even without a policy revision (logged);
    /// without the flag it waits for one, like `/readyz`.
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    startup_fail_open_after: Option<Duration>,
    /// Requests for hosts no integration claims: pass them through untouched, or deny (403).
    #[arg(long, value_enum, default_value = "pass")]
    unknown_hosts: UnknownHosts,
    /// Extra CA certificates (PEM) trusted for partner TLS, besides the system's.
    #[arg(long, value_name = "FILE")]
    ca_bundle: Option<PathBuf>,
    /// Largest request head (request line + headers) accepted; larger gets 431.
    #[arg(long, default_value_t = 32 * 1024)]
    max_header_bytes: usize,
    /// Largest request body accepted; larger gets 400.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    max_body_bytes: u64,
    /// Request bodies up to this size are buffered and can be retried; larger ones stream once.
    #[arg(long, default_value_t = 64 * 1024)]
    replay_limit: usize,
    /// App connections open at once.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    /// CONNECT tunnels open at once.
    #[arg(long, default_value_t = 1024)]
    max_tunnels: usize,
    /// Time a client has to send its request head.
    #[arg(long, default_value = "10s", value_parser = duration_arg)]
    header_read_timeout: Duration,
    /// On SIGTERM, how long open connections may finish.
    #[arg(long, default_value = "15s", value_parser = duration_arg)]
    drain_timeout: Duration,
    /// An idle connection to a partner is closed after this long.
    #[arg(long, default_value = "90s", value_parser = duration_arg)]
    pool_idle_timeout: Duration,
    /// Idle connections kept per partner (scheme, host, port).
    #[arg(long, default_value_t = 64)]
    pool_max_idle_per_host: usize,
    /// Connections open per partner (scheme, host, port), in use and idle; beyond it a call
    /// waits, within its deadline, for one to free up.
    #[arg(long, default_value_t = 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pool_max_per_host: usize,
    /// A partner connection older than this is not reused (default: no limit).
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    pool_ttl: Option<Duration>,
    /// How often the config file and secrets are checked for changes.
    #[arg(long, default_value = "500ms", value_parser = duration_arg)]
    reload_interval: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    transparent: transparent::Flags,
    #[command(flatten)]
    intercept: intercept::Flags,
}

fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    if let Some(command) = args.command.take() {
        return command.run();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate-sidecar: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-sidecar: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let mut telemetry = telemetry::init(args.log_format, "info", metrics.spans_dropped.clone())?;
    let ca = match &args.ca_bundle {
        Some(p) => Some(
            std::fs::read(p).map_err(|e| anyhow::anyhow!("--ca-bundle {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let roots = client::roots(ca.as_deref())?;
    let tls = client::config_from_roots(roots.clone())?;
    let store = Arc::new(Store::default());
    let mut ctx = StateContext::new(tls.clone()).with_roots(roots);
    ctx.metrics = metrics.clone();
    ctx.pool = client::PoolOptions {
        idle_timeout: args.pool_idle_timeout,
        max_idle_per_host: args.pool_max_idle_per_host,
        max_per_host: args.pool_max_per_host,
        ttl: args.pool_ttl.filter(|t| !t.is_zero()),
    };

    match (&args.config, &args.operator) {
        (Some(config_path), None) => {
            let source = FileSource {
                path: config_path.clone(),
                secrets: SecretsDir::new(args.secrets_dir.clone()),
                store: store.clone(),
                ctx: ctx.clone(),
                metrics: metrics.clone(),
            };
            // The first load must succeed: there is no previous revision to keep.
            let id = source.reload().map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(revision = %id, path = %config_path.display(), integrations = store.load().integrations.len(), "config loaded");
            tokio::spawn(source.watch(args.reload_interval));
        }
        (None, Some(url)) => {
            if args.pod_name.is_empty() || args.pod_namespace.is_empty() {
                anyhow::bail!(
                    "cluster mode needs --pod-name and --pod-namespace (or POD_NAME and POD_NAMESPACE)"
                );
            }
            let uri: http::Uri = url
                .parse()
                .map_err(|e| anyhow::anyhow!("--operator {url:?}: {e}"))?;
            if uri.scheme_str() != Some("https") {
                anyhow::bail!("--operator {url:?}: must be an https:// URL");
            }
            let source = Arc::new(OperatorSource::new(
                url.clone(),
                store.clone(),
                ctx.clone(),
                metrics.clone(),
            ));
            let mut config = ClusterConfig::new(
                uri,
                &args.token_file,
                &args.operator_ca,
                &args.pod_name,
                &args.pod_namespace,
                &args.state_file,
            );
            config.server_name = args.operator_server_name.clone();
            // The kubelet writes the file before the container starts: a path that does not
            // read is a mistake, and would never report a change.
            if let Some(path) = &args.labels_file {
                std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("--labels-file {}: {e}", path.display()))?;
            }
            config.labels_file = args.labels_file.clone();
            let (apply, report) = (source.clone(), source.clone());
            let mut client = ClusterClient::new(
                config,
                Arc::new(move |s| apply.apply(s)),
                Arc::new(move || report.report()),
            );
            // Before the listener exists: the first request meets the last good revision.
            client.restore();
            tracing::info!(operator = %url, pod = %args.pod_name, namespace = %args.pod_namespace, "subscribing to the operator");
            tokio::spawn(client.run());
        }
        _ => anyhow::bail!(
            "no policy source: give --config FILE (standalone) or --operator URL (cluster mode)"
        ),
    }

    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", args.listen))?;
    let admin_listener = TcpListener::bind(args.admin)
        .await
        .map_err(|e| anyhow::anyhow!("--admin {}: {e}", args.admin))?;
    let transparent = transparent::Listeners::bind(&args.transparent).await?;
    let listen = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let options = ProxyOptions {
        listen,
        unknown_hosts: args.unknown_hosts,
        max_header_bytes: args.max_header_bytes,
        replay_limit: args.replay_limit,
        max_body_bytes: args.max_body_bytes,
        header_read_timeout: args.header_read_timeout,
        max_connections: args.max_connections,
        max_tunnels: args.max_tunnels,
        ..ProxyOptions::default()
    };
    // Before the ready line: an app held until the trust files exist then finds them.
    let interceptor = Arc::new(intercept::Interceptor::start(&args.intercept, &metrics));
    let tls_fallback = interceptor.fallback().map(str::to_string);
    let stack = layers::stack(StackContext {
        metrics: metrics.clone(),
    });
    tokio::spawn(tollgate_sidecar::verify::run(store.clone(), stack.clone()));
    let proxy = Arc::new(Proxy {
        store: store.clone(),
        stack,
        passthrough: client::build(tls, options.passthrough_connect_timeout, &ctx.pool),
        tunnels: Arc::new(Semaphore::new(options.max_tunnels)),
        intercept: interceptor,
        options,
        metrics: metrics.clone(),
    });
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(Admin {
            store,
            metrics,
            tls_fallback,
            startup: match args.startup_fail_open_after {
                Some(after) => admin::StartupGate::open_after(after),
                None => admin::StartupGate::closed(),
            },
        }),
    ));
    let transparent = transparent.spawn(proxy.clone(), shutdown_signal, args.drain_timeout);
    tracing::info!(listen = %listen, admin = %admin_addr, otlp = telemetry.exporting(), "tollgate-sidecar ready");
    server::serve(listener, proxy, shutdown_signal(), args.drain_timeout).await;
    transparent.finish().await;
    telemetry.shutdown();
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
}

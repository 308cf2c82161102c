//! `tollgate-operator`: the control plane binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::runtime::events::Reporter;
use tokio::net::TcpListener;
use tollgate_operator::catalog::CatalogHandle;
use tollgate_operator::controller::{self, Context};
use tollgate_operator::distribution::{
    Authenticator, Distribution, Hub, HubSettings, ServerLimits, serve, tls_config_from_files,
};
use tollgate_operator::leader::{LeaderElector, Leadership, LeaseConfig};
use tollgate_operator::metrics::{self, Metrics, Readiness};
use tollgate_operator::peers::{self, PeerConfig};

/// Reconciles PartnerIntegrations and pushes policy revisions to Tollgate sidecars.
#[derive(Parser, Debug)]
#[command(name = "tollgate-operator", version)]
struct Args {
    /// Watch only this namespace (repeatable). Default: every namespace.
    #[arg(long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,

    /// Address of the HTTPS endpoint sidecars subscribe to.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,

    /// PEM certificate chain of the endpoint.
    #[arg(long, value_name = "PATH")]
    tls_cert: String,

    /// PEM private key of the endpoint.
    #[arg(long, value_name = "PATH")]
    tls_key: String,

    /// Address of the admin listener (/metrics, /healthz, /readyz), plain HTTP.
    #[arg(long, default_value = "0.0.0.0:8080")]
    admin: SocketAddr,

    /// Run as one of several replicas: elect a leader with a Lease and exchange sidecar state
    /// through peer Leases. Off: a single replica that always writes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,

    /// Name of the Lease.
    #[arg(long, default_value = "tollgate-operator")]
    lease_name: String,

    /// Namespace of the Lease (normally the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "tollgate-system")]
    lease_namespace: String,

    /// This replica's identity in the Lease and in events.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// How long a Lease stays valid without renewal.
    #[arg(long, default_value = "15s", value_parser = tollgate_crds::duration::flag)]
    lease_duration: Duration,

    /// How often the Lease is renewed or contested.
    #[arg(long, default_value = "5s", value_parser = tollgate_crds::duration::flag)]
    lease_renew: Duration,

    /// How often each replica publishes its sidecars' state to the others (peer Leases).
    #[arg(long, default_value = "5s", value_parser = tollgate_crds::duration::flag)]
    peer_interval: Duration,

    /// How often each status is refreshed from sidecar reports.
    #[arg(long, default_value = "10s", value_parser = tollgate_crds::duration::flag)]
    status_interval: Duration,

    /// Heartbeat on idle streams. A sidecar that hears nothing for three heartbeats
    /// reconnects, and its share of global bands is reclaimed a second after that.
    #[arg(long, default_value = "5s", value_parser = tollgate_crds::duration::flag)]
    heartbeat: Duration,

    /// How often sidecars report.
    #[arg(long, default_value = "5s", value_parser = tollgate_crds::duration::flag)]
    report_interval: Duration,

    /// Most connections the endpoint holds at once.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,

    /// Largest request header block, bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    max_header_bytes: usize,

    /// Largest ack/report body, bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    max_body_bytes: usize,

    /// Streams one pod may hold open at once (more are refused with 429).
    #[arg(long, default_value_t = 4)]
    max_streams_per_pod: usize,

    /// How often each open stream's token and pod are verified again (TokenReview and a
    /// read of the Pod); a pod deleted, recreated or relabelled ends its stream.
    #[arg(long, default_value = "60s", value_parser = tollgate_crds::duration::flag)]
    stream_recheck: Duration,

    /// Longest wait for a request's headers, and for an ack or report body.
    #[arg(long, default_value = "10s", value_parser = tollgate_crds::duration::flag)]
    request_timeout: Duration,

    /// How long a token the API server refused is refused from memory.
    #[arg(long, default_value = "30s", value_parser = tollgate_crds::duration::flag)]
    refused_token_ttl: Duration,

    /// TokenReviews in flight at once.
    #[arg(long, default_value_t = 32)]
    max_concurrent_reviews: usize,

    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,

    #[command(flatten)]
    webhook: tollgate_operator::webhook::Flags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    // One provider for every TLS user in the process (kube's client and our endpoint).
    let _ = rustls::crypto::ring::default_provider().install_default();

    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("tollgate-operator-{}", std::process::id()));

    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or kubeconfig)")?;
    controller::check_crd(&client, &args.namespaces).await?;

    let tls = tls_config_from_files(&args.tls_cert, &args.tls_key)?;
    let metrics = Arc::new(Metrics::new());
    let ready = Readiness::default();
    let catalog = CatalogHandle::new();
    let (peers_tx, peers_rx) = tokio::sync::watch::channel(Arc::default());
    let hub = Hub::with_peers(
        catalog.clone(),
        metrics.clone(),
        HubSettings {
            heartbeat: args.heartbeat,
            report_interval: args.report_interval,
            budget_delay: HubSettings::budget_delay_for(args.peer_interval),
            ..HubSettings::default()
        },
        peers_rx,
    );
    tokio::spawn(hub.clone().run());

    let leadership = if args.leader_election {
        let (elector, leadership) = LeaderElector::new(
            client.clone(),
            LeaseConfig {
                namespace: args.lease_namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                lease_duration: args.lease_duration,
                renew_every: args.lease_renew,
            },
        );
        tokio::spawn(elector.run(metrics.clone()));
        // Several replicas: each tells the others which sidecars it serves.
        let peer_cfg = PeerConfig {
            namespace: args.lease_namespace.clone(),
            identity: identity.clone(),
            interval: args.peer_interval,
        };
        tokio::spawn(peers::follow(client.clone(), peer_cfg.clone(), peers_tx));
        tokio::spawn(peers::publish(client.clone(), peer_cfg, hub.clone()));
        leadership
    } else {
        drop(peers_tx);
        metrics.leader.set(1);
        Leadership::always()
    };

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let distribution = Arc::new(Distribution {
        hub: hub.clone(),
        auth: Authenticator::with_limits(
            client.clone(),
            args.refused_token_ttl,
            args.max_concurrent_reviews,
        ),
        metrics: metrics.clone(),
        limits: ServerLimits {
            max_connections: args.max_connections,
            max_header_bytes: args.max_header_bytes,
            max_body_bytes: args.max_body_bytes,
            max_streams_per_pod: args.max_streams_per_pod,
            stream_recheck: args.stream_recheck,
            header_timeout: args.request_timeout,
            body_timeout: args.request_timeout,
            refused_token_ttl: args.refused_token_ttl,
            max_concurrent_reviews: args.max_concurrent_reviews,
            ..ServerLimits::default()
        },
    });
    // Sidecars are served only once the initial sync is done: a replica that just started
    // holds an empty or partial catalog, and a sidecar applies and persists what it is sent.
    // Until then connections wait in the listen queue (a sidecar times out and retries,
    // enforcing what it holds); /readyz says not ready.
    {
        let catalog = catalog.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            catalog.wait_synced().await;
            ready.set(true);
            tracing::info!("initial sync done; serving sidecars");
            serve(listener, Arc::new(tls), distribution).await;
        });
    }
    let admin = metrics::bind(args.admin)
        .await
        .with_context(|| format!("binding {}", args.admin))?;
    tokio::spawn(metrics::serve_admin(admin, metrics.clone(), ready.clone()));
    // The webhook's namespace is the operator's own: where its Secret lives, never injected.
    tollgate_operator::webhook::start(
        &args.webhook,
        &args.lease_namespace,
        client.clone(),
        leadership.clone(),
        metrics.clone(),
    )
    .await?;
    tracing::info!(listen = %args.listen, admin = %args.admin, %identity, namespaces = ?args.namespaces, "tollgate-operator started");

    let ctx = Arc::new(Context::new(
        client,
        catalog,
        hub,
        leadership,
        metrics,
        Reporter {
            controller: controller::FIELD_MANAGER.to_string(),
            instance: Some(identity),
        },
        args.status_interval,
    ));
    controller::run(ctx, args.namespaces).await;
    tracing::info!("tollgate-operator stopped");
    Ok(())
}

//! The sidecar injection webhook (docs/injection.md).
//!
//! - [`inject`]: which pods get the sidecar, and the JSON patch that adds it (pure).
//! - [`server`]: the HTTPS endpoint answering AdmissionReviews.
//! - [`certs`]: the webhook's own CA and serving certificate, and when to renew them (pure).
//! - [`rotation`]: that certificate in a Secret shared by the replicas, and the webhook
//!   configuration's `caBundle` (written by the leader).
//! - [`trust`]: the CA of the distribution endpoint, published where injected pods mount it.
//!
//! Off unless `--webhook-listen` is given. With `--webhook-tls-cert`/`--webhook-tls-key` (e.g.
//! from cert-manager) the files are served and re-read when they change, and the operator
//! neither keeps a CA nor touches `caBundle`.

pub mod certs;
pub mod inject;
pub mod rotation;
pub mod server;
pub mod trust;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ResourceRequirements;
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::inject::{
    InjectConfig, Mode, OnTimeout, SYSTEM_NAMESPACES, SidecarTelemetry, StartupGate,
};
use self::server::{CertSlot, Webhook};
use crate::leader::Leadership;
use crate::metrics::Metrics;

const DEFAULT_SIDECAR_RESOURCES: &str =
    r#"{"requests":{"cpu":"20m","memory":"32Mi"},"limits":{"memory":"128Mi"}}"#;
const DEFAULT_INIT_RESOURCES: &str =
    r#"{"requests":{"cpu":"10m","memory":"16Mi"},"limits":{"memory":"64Mi"}}"#;
const DEFAULT_NO_PROXY: &str = "localhost,127.0.0.1,::1,.svc,.cluster.local";
/// A CA lives ten years; renewed with a third left, long before any certificate it signed.
const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);
/// How often the certificate and the CA ConfigMaps are checked besides watch events.
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// How often every CA ConfigMap is applied again, repairing deleted copies.
const CA_REFRESH: Duration = Duration::from_secs(600);
/// How often the operator's address (for the interception exemption) is resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// How long start-up waits for the first certificate before reporting ready anyway.
const FIRST_CERT_WAIT: Duration = Duration::from_secs(30);

/// The webhook's flags (flattened into the operator's).
#[derive(Debug, Clone, clap::Args)]
pub struct Flags {
    /// Serve the sidecar injection webhook (HTTPS) on this address. Off unless given.
    #[arg(long, value_name = "ADDR")]
    pub webhook_listen: Option<SocketAddr>,

    /// PEM certificate of the webhook from another issuer (cert-manager): re-read when it
    /// changes; the operator then keeps no CA and leaves caBundle alone.
    #[arg(long, value_name = "PATH", requires = "webhook_tls_key")]
    pub webhook_tls_cert: Option<PathBuf>,

    /// PEM private key for --webhook-tls-cert.
    #[arg(long, value_name = "PATH", requires = "webhook_tls_cert")]
    pub webhook_tls_key: Option<PathBuf>,

    /// Secret, in the operator's namespace, holding the operator's own webhook CA and
    /// certificate (shared by the replicas; written by the leader).
    #[arg(long, default_value = "tollgate-webhook-tls")]
    pub webhook_secret: String,

    /// MutatingWebhookConfiguration whose caBundle the leader keeps equal to that CA
    /// ("" leaves every configuration alone).
    #[arg(long, default_value = "tollgate-sidecar-injector")]
    pub webhook_configuration: String,

    /// Service in front of the webhook: its in-cluster names go into the certificate.
    #[arg(long, default_value = "tollgate-operator")]
    pub webhook_service: String,

    /// Another DNS name or IP address for the webhook certificate (repeatable).
    #[arg(long = "webhook-host", value_name = "NAME")]
    pub webhook_hosts: Vec<String>,

    /// Cluster DNS domain, for the certificate's names.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Lifetime of the webhook certificate; renewed with a third of it left.
    #[arg(long, default_value = "2160h", value_parser = tollgate_crds::duration::flag)]
    pub webhook_cert_validity: Duration,

    /// Another namespace never injected (repeatable). kube-system, kube-public,
    /// kube-node-lease and the operator's own namespace always are.
    #[arg(long = "webhook-exclude-namespace", value_name = "NS")]
    pub webhook_exclude_namespaces: Vec<String>,

    /// Image of the injected sidecar (needs `tollgate-sidecar` on its PATH).
    #[arg(long, value_name = "IMAGE")]
    pub sidecar_image: Option<String>,

    /// Image of the iptables init container (default: the sidecar image; it needs iptables).
    #[arg(long, value_name = "IMAGE")]
    pub init_image: Option<String>,

    /// imagePullPolicy of the injected containers (default: the cluster's).
    #[arg(long, value_name = "POLICY")]
    pub sidecar_image_pull_policy: Option<String>,

    /// The distribution endpoint as injected sidecars reach it
    /// (`https://tollgate-operator.tollgate-system.svc:8443`).
    #[arg(long, value_name = "URL")]
    pub sidecar_operator_url: Option<String>,

    /// PEM CA that signs the distribution endpoint's certificate, published to every
    /// namespace for the sidecars (the chart's `ca.crt`).
    #[arg(long, value_name = "PATH")]
    pub sidecar_ca_file: Option<PathBuf>,

    /// Name of the ConfigMap that carries that CA in each namespace.
    #[arg(long, default_value = "tollgate-operator-ca")]
    pub sidecar_ca_configmap: String,

    /// UID (and GID) of the sidecar; exempt from interception.
    #[arg(long, default_value_t = 1337)]
    pub sidecar_uid: i64,

    /// The sidecar's forward-proxy port (HTTP_PROXY in proxy-env mode).
    #[arg(long, default_value_t = 15080)]
    pub sidecar_proxy_port: u16,

    /// The sidecar's transparent listener port (iptables mode).
    #[arg(long, default_value_t = 15001)]
    pub sidecar_transparent_port: u16,

    /// The sidecar's admin port (/metrics, /healthz; on the pod IP for the startup probe).
    #[arg(long, default_value_t = 15090)]
    pub sidecar_admin_port: u16,

    /// Resources of the sidecar container, as JSON (a ResourceRequirements).
    #[arg(long, default_value = DEFAULT_SIDECAR_RESOURCES, value_parser = resources)]
    pub sidecar_resources: ResourceRequirements,

    /// Resources of the iptables init container, as JSON.
    #[arg(long, default_value = DEFAULT_INIT_RESOURCES, value_parser = resources)]
    pub init_resources: ResourceRequirements,

    /// Another argument for the sidecar (repeatable), e.g. `--sidecar-arg=--unknown-hosts=deny`.
    #[arg(long = "sidecar-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub sidecar_args: Vec<String>,

    /// Lifetime of the sidecar's projected token (at least 10m; the kubelet renews it).
    #[arg(long, default_value = "1h", value_parser = tollgate_crds::duration::flag)]
    pub sidecar_token_expiration: Duration,

    /// Mode of a pod without the `tollgate.dev/interception` annotation.
    #[arg(long, value_enum, default_value = "iptables")]
    pub interception_default: Mode,

    /// Destination ports redirected to the sidecar in iptables mode.
    #[arg(long, value_delimiter = ',', default_value = "80,443")]
    pub intercept_ports: Vec<u16>,

    /// Destinations (CIDRs) never redirected, besides the operator's own addresses.
    #[arg(long, value_delimiter = ',', value_name = "CIDR")]
    pub intercept_exclude_cidrs: Vec<String>,

    /// NO_PROXY (and no_proxy) set in proxy-env mode.
    #[arg(long, default_value = DEFAULT_NO_PROXY)]
    pub proxy_env_no_proxy: String,

    /// How long an injected pod's app waits for the sidecar's first revision (received or
    /// persisted) before --sidecar-startup-on-timeout applies (1s to 1h).
    #[arg(long, default_value = "60s", value_parser = tollgate_crds::duration::flag)]
    pub sidecar_startup_timeout: Duration,

    /// When that wait expires: `fail` (the sidecar's startup probe fails, the app never starts
    /// ungoverned) or `open` (the app starts with no policy in force; the sidecar logs it).
    #[arg(long, value_enum, default_value = "fail")]
    pub sidecar_startup_on_timeout: OnTimeout,

    /// OTEL_EXPORTER_OTLP_ENDPOINT of injected sidecars (http:// or https://); without it no
    /// OTEL_* variable is set and sidecars export no spans.
    #[arg(long, value_name = "URL")]
    pub sidecar_otlp_endpoint: Option<String>,

    /// OTEL_EXPORTER_OTLP_PROTOCOL of injected sidecars: http/protobuf or grpc.
    #[arg(long, value_name = "PROTOCOL")]
    pub sidecar_otlp_protocol: Option<String>,

    /// OTEL_TRACES_SAMPLER of injected sidecars (e.g. parentbased_traceidratio).
    #[arg(long, value_name = "SAMPLER")]
    pub sidecar_traces_sampler: Option<String>,

    /// OTEL_TRACES_SAMPLER_ARG of injected sidecars (e.g. 0.1).
    #[arg(long, value_name = "ARG")]
    pub sidecar_traces_sampler_arg: Option<String>,

    /// OTEL_SERVICE_NAME of injected sidecars.
    #[arg(long, value_name = "NAME")]
    pub sidecar_service_name: Option<String>,

    /// Another OTLP resource attribute of injected sidecars, KEY=VALUE (repeatable); each
    /// already has k8s.pod.name and k8s.namespace.name.
    #[arg(long = "sidecar-resource-attribute", value_name = "KEY=VALUE", value_parser = resource_attribute)]
    pub sidecar_resource_attributes: Vec<(String, String)>,

    /// Annotate injected pods prometheus.io/scrape, port and path (the sidecar's /metrics),
    /// unless a pod sets them itself.
    #[arg(long, default_value_t = false)]
    pub sidecar_scrape_annotations: bool,
}

/// `KEY=VALUE` of an OTLP resource attribute; neither part may hold `,`, `=` or whitespace
/// (OTEL_RESOURCE_ATTRIBUTES separators).
fn resource_attribute(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let bad = |p: &str| p.contains([',', '=']) || p.chars().any(char::is_whitespace);
    if k.is_empty() || bad(k) || bad(v) {
        return Err(format!(
            "{s:?}: KEY=VALUE with a non-empty key, and no ',', '=' or whitespace in either"
        ));
    }
    Ok((k.to_string(), v.to_string()))
}

fn resources(s: &str) -> Result<ResourceRequirements, String> {
    serde_json::from_str(s).map_err(|e| format!("not a ResourceRequirements in JSON: {e}"))
}

impl Flags {
    /// The injection settings; errors name the flag.
    pub fn inject_config(&self, operator_namespace: &str) -> anyhow::Result<InjectConfig> {
        let sidecar_image = self
            .sidecar_image
            .clone()
            .context("--webhook-listen needs --sidecar-image")?;
        let operator_url = self
            .sidecar_operator_url
            .clone()
            .context("--webhook-listen needs --sidecar-operator-url")?;
        let uri: http::Uri = operator_url
            .parse()
            .with_context(|| format!("--sidecar-operator-url {operator_url:?}"))?;
        if uri.scheme_str() != Some("https") || uri.host().is_none() {
            anyhow::bail!("--sidecar-operator-url {operator_url:?}: must be an https:// URL");
        }
        if self.sidecar_uid <= 0 {
            anyhow::bail!("--sidecar-uid must not be 0: root traffic would escape interception");
        }
        if self.intercept_ports.is_empty() || self.intercept_ports.contains(&0) {
            anyhow::bail!("--intercept-ports: give ports from 1 to 65535");
        }
        let token_secs = i64::try_from(self.sidecar_token_expiration.as_secs()).unwrap_or(i64::MAX);
        if token_secs < 600 {
            anyhow::bail!("--sidecar-token-expiration: at least 10m (the API server's minimum)");
        }
        let startup_secs = self.sidecar_startup_timeout.as_secs();
        if !(1..=3600).contains(&startup_secs) || self.sidecar_startup_timeout.subsec_nanos() != 0 {
            anyhow::bail!("--sidecar-startup-timeout: whole seconds from 1s to 1h");
        }
        let telemetry = self.sidecar_telemetry()?;
        let mut excluded: BTreeSet<String> =
            SYSTEM_NAMESPACES.iter().map(|s| (*s).to_string()).collect();
        excluded.insert(operator_namespace.to_string());
        excluded.extend(self.webhook_exclude_namespaces.iter().cloned());
        Ok(InjectConfig {
            init_image: self
                .init_image
                .clone()
                .unwrap_or_else(|| sidecar_image.clone()),
            sidecar_image,
            image_pull_policy: self.sidecar_image_pull_policy.clone(),
            operator_url,
            ca_configmap: self.sidecar_ca_configmap.clone(),
            uid: self.sidecar_uid,
            proxy_port: self.sidecar_proxy_port,
            transparent_port: self.sidecar_transparent_port,
            admin_port: self.sidecar_admin_port,
            intercept_ports: self.intercept_ports.clone(),
            exclude_cidrs: self.intercept_exclude_cidrs.clone(),
            default_mode: self.interception_default,
            no_proxy: self.proxy_env_no_proxy.clone(),
            sidecar_resources: self.sidecar_resources.clone(),
            init_resources: self.init_resources.clone(),
            token_expiration_seconds: token_secs,
            sidecar_args: self.sidecar_args.clone(),
            excluded_namespaces: excluded,
            startup: StartupGate {
                // At most 3600: fits.
                timeout_seconds: i32::try_from(startup_secs).unwrap_or(3600),
                on_timeout: self.sidecar_startup_on_timeout,
            },
            telemetry,
        })
    }

    /// The sidecars' telemetry settings; errors name the flag.
    fn sidecar_telemetry(&self) -> anyhow::Result<SidecarTelemetry> {
        let set = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
        let otlp_endpoint = set(&self.sidecar_otlp_endpoint);
        if let Some(e) = &otlp_endpoint {
            let uri: http::Uri = e
                .parse()
                .with_context(|| format!("--sidecar-otlp-endpoint {e:?}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                anyhow::bail!("--sidecar-otlp-endpoint {e:?}: must be an http:// or https:// URL");
            }
        }
        let otlp_protocol = set(&self.sidecar_otlp_protocol);
        if let Some(p) = &otlp_protocol
            && p != "http/protobuf"
            && p != "grpc"
        {
            anyhow::bail!("--sidecar-otlp-protocol {p:?}: http/protobuf or grpc");
        }
        let sampler_arg = set(&self.sidecar_traces_sampler_arg);
        if let Some(a) = &sampler_arg
            && !a.parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r))
        {
            anyhow::bail!("--sidecar-traces-sampler-arg {a:?}: a ratio from 0 to 1");
        }
        Ok(SidecarTelemetry {
            otlp_endpoint,
            otlp_protocol,
            sampler: set(&self.sidecar_traces_sampler),
            sampler_arg,
            service_name: set(&self.sidecar_service_name),
            resource_attributes: self.sidecar_resource_attributes.clone(),
            scrape_annotations: self.sidecar_scrape_annotations,
        })
    }
}

/// Starts the webhook and its helpers when `--webhook-listen` is given: binds the listener
/// (an error here stops the operator), then runs in spawned tasks. With its own certificate it
/// returns once one is served (at most [`FIRST_CERT_WAIT`]), so a replica is not reported
/// ready while every webhook call to it would fail its TLS handshake.
pub async fn start(
    flags: &Flags,
    operator_namespace: &str,
    client: kube::Client,
    leadership: Leadership,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let Some(listen) = flags.webhook_listen else {
        return Ok(());
    };
    let config = flags.inject_config(operator_namespace)?;
    let ca_file = flags
        .sidecar_ca_file
        .clone()
        .context("--webhook-listen needs --sidecar-ca-file (the CA sidecars trust)")?;

    let mut first_cert = None;
    let tls = match (&flags.webhook_tls_cert, &flags.webhook_tls_key) {
        (Some(cert), Some(key)) => {
            tracing::info!(cert = %cert.display(), "webhook certificate from files; caBundle left to their issuer");
            crate::distribution::tls_config_from_files(
                &cert.display().to_string(),
                &key.display().to_string(),
            )?
        }
        _ => {
            let hosts = certs::service_hosts(
                &flags.webhook_service,
                operator_namespace,
                &flags.cluster_domain,
                &flags.webhook_hosts,
            );
            let managed = rotation::ManagedCerts {
                namespace: operator_namespace.to_string(),
                secret: flags.webhook_secret.clone(),
                configuration: Some(flags.webhook_configuration.clone()).filter(|c| !c.is_empty()),
                policy: certs::CertPolicy {
                    hosts,
                    cert_validity: flags.webhook_cert_validity,
                    ca_validity: CA_VALIDITY,
                },
                check_every: CHECK_EVERY,
            };
            if managed.policy.hosts.is_empty() {
                anyhow::bail!("the webhook certificate needs --webhook-service or --webhook-host");
            }
            let slot = Arc::new(CertSlot::default());
            tokio::spawn(rotation::run(
                client.clone(),
                managed,
                leadership.clone(),
                slot.clone(),
                metrics.clone(),
            ));
            first_cert = Some(slot.clone());
            server::slot_tls_config(slot)?
        }
    };

    tokio::spawn(trust::run(
        client,
        trust::CaPublisher {
            configmap: flags.sidecar_ca_configmap.clone(),
            ca_file,
            excluded: config.excluded_namespaces.clone(),
            check_every: CHECK_EVERY,
            refresh: CA_REFRESH,
        },
        leadership,
        metrics.clone(),
    ));

    let operator_cidrs = operator_addresses(&config.operator_url, metrics.clone());
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding --webhook-listen {listen}"))?;
    tracing::info!(%listen, excluded = ?config.excluded_namespaces, "injection webhook started");
    let webhook = Arc::new(Webhook {
        config,
        operator_cidrs,
        metrics,
    });
    tokio::spawn(server::serve(listener, Arc::new(tls), webhook));
    if let Some(slot) = first_cert {
        let waited = tokio::time::timeout(FIRST_CERT_WAIT, async {
            while !slot.is_set() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(secret = %flags.webhook_secret, "no webhook certificate yet (the leader creates it); serving without one until it appears");
        }
    }
    Ok(())
}

/// The operator's IPv4 addresses as `/32`s, for the interception exemption: fixed for an
/// address in the URL, else resolved now and every [`RESOLVE_EVERY`]. (IPv6 interception is
/// off by default, so IPv6 addresses need no exemption.)
fn operator_addresses(url: &str, metrics: Arc<Metrics>) -> watch::Receiver<Arc<Vec<String>>> {
    let uri: http::Uri = url.parse().unwrap_or_default();
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    if let Ok(ip) = host.parse::<IpAddr>() {
        let fixed = match ip {
            IpAddr::V4(v4) => vec![format!("{v4}/32")],
            IpAddr::V6(_) => Vec::new(),
        };
        return watch::channel(Arc::new(fixed)).1;
    }
    let (tx, rx) = watch::channel(Arc::new(Vec::new()));
    tokio::spawn(async move {
        let mut reported = false;
        loop {
            match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(addrs) => {
                    reported = false;
                    let mut v: Vec<String> = addrs
                        .filter_map(|a| match a.ip() {
                            IpAddr::V4(v4) => Some(format!("{v4}/32")),
                            IpAddr::V6(_) => None,
                        })
                        .collect();
                    v.sort();
                    v.dedup();
                    tx.send_if_modified(|cur| {
                        if **cur == v {
                            return false;
                        }
                        tracing::info!(%host, addresses = ?v, "operator addresses exempt from interception");
                        *cur = Arc::new(v);
                        true
                    });
                }
                Err(e) if !reported => {
                    reported = true;
                    tracing::warn!(%host, error = %e, "cannot resolve the operator's address; injected pods exempt it by the sidecar's UID only");
                    metrics.webhook_error("operator-address");
                }
                Err(_) => {}
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(RESOLVE_EVERY).await;
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        webhook: Flags,
    }

    fn flags(args: &[&str]) -> Flags {
        Cli::try_parse_from(std::iter::once("op").chain(args.iter().copied()))
            .unwrap()
            .webhook
    }

    #[test]
    fn defaults_make_a_complete_configuration() {
        let f = flags(&[
            "--webhook-listen=0.0.0.0:9443",
            "--sidecar-image=ghcr.io/tollgate-dev/tollgate-sidecar:1",
            "--sidecar-operator-url=https://tollgate-operator.tollgate-system.svc:8443",
        ]);
        let c = f.inject_config("tollgate-system").unwrap();
        assert_eq!(c.init_image, c.sidecar_image);
        assert_eq!(
            (c.uid, c.proxy_port, c.transparent_port, c.admin_port),
            (1337, 15080, 15001, 15090)
        );
        assert_eq!(c.intercept_ports, vec![80, 443]);
        assert_eq!(c.default_mode, Mode::Iptables);
        assert_eq!(c.token_expiration_seconds, 3600);
        assert_eq!(
            serde_json::to_value(&c.sidecar_resources).unwrap(),
            serde_json::json!({"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}})
        );
        let excluded: Vec<&str> = c.excluded_namespaces.iter().map(String::as_str).collect();
        assert_eq!(
            excluded,
            [
                "kube-node-lease",
                "kube-public",
                "kube-system",
                "tollgate-system"
            ]
        );
        assert_eq!(f.webhook_cert_validity, Duration::from_secs(90 * 24 * 3600));
        assert_eq!(
            c.startup,
            StartupGate {
                timeout_seconds: 60,
                on_timeout: OnTimeout::Fail
            },
            "fail closed by default"
        );
    }

    #[test]
    fn bad_settings_name_their_flag() {
        let err = |args: &[&str]| flags(args).inject_config("ns").unwrap_err().to_string();
        assert!(err(&["--sidecar-operator-url=https://op:8443"]).contains("--sidecar-image"));
        assert!(err(&["--sidecar-image=i"]).contains("--sidecar-operator-url"));
        assert!(
            err(&["--sidecar-image=i", "--sidecar-operator-url=http://op:8443"])
                .contains("https://")
        );
        assert!(
            err(&[
                "--sidecar-image=i",
                "--sidecar-operator-url=https://op",
                "--sidecar-uid=0"
            ])
            .contains("--sidecar-uid")
        );
        for bad in ["0s", "1500ms", "2h"] {
            assert!(
                err(&[
                    "--sidecar-image=i",
                    "--sidecar-operator-url=https://op",
                    &format!("--sidecar-startup-timeout={bad}")
                ])
                .contains("--sidecar-startup-timeout"),
                "{bad}"
            );
        }
        assert!(Cli::try_parse_from(["op", "--sidecar-startup-on-timeout=maybe"]).is_err());
        assert!(Cli::try_parse_from(["op", "--sidecar-resources={not json"]).is_err());
        assert!(
            Cli::try_parse_from(["op", "--webhook-tls-cert=/a"]).is_err(),
            "needs the key too"
        );
    }

    #[test]
    fn bad_telemetry_flags_name_their_flag() {
        let base = ["--sidecar-image=i", "--sidecar-operator-url=https://op"];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend(extra);
            flags(&args).inject_config("ns")
        };
        for (arg, flag) in [
            (
                "--sidecar-otlp-endpoint=collector:4317",
                "--sidecar-otlp-endpoint",
            ),
            ("--sidecar-otlp-protocol=thrift", "--sidecar-otlp-protocol"),
            (
                "--sidecar-traces-sampler-arg=2",
                "--sidecar-traces-sampler-arg",
            ),
        ] {
            let e = with(&[arg]).unwrap_err().to_string();
            assert!(e.contains(flag), "{arg}: {e}");
        }
        for bad in ["k", "=v", "k=a,b", "k=a b"] {
            assert!(
                Cli::try_parse_from(["op", &format!("--sidecar-resource-attribute={bad}")])
                    .is_err(),
                "{bad}"
            );
        }
        let t = with(&[
            "--sidecar-otlp-endpoint=http://collector:4318",
            "--sidecar-resource-attribute=deployment.environment=prod",
            "--sidecar-scrape-annotations",
        ])
        .unwrap()
        .telemetry;
        assert_eq!(t.otlp_endpoint.as_deref(), Some("http://collector:4318"));
        assert_eq!(
            t.resource_attributes,
            [("deployment.environment".to_string(), "prod".to_string())]
        );
        assert!(t.scrape_annotations);
        assert_eq!(with(&[]).unwrap().telemetry, SidecarTelemetry::default());
    }
}

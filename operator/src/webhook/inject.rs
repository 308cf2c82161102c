//! Which pods get the sidecar, and the JSON patch that adds it. Pure: no I/O, no clock.
//!
//! [`decide`] reads the pod, its namespace and which webhook called ([`Scope`]); [`patch`]
//! builds the RFC 6902 operations. What an injected pod gets:
//!
//! - `tollgate-init` (iptables mode only), first of the init containers: root with NET_ADMIN
//!   and NET_RAW, and only those, running `tollgate-sidecar setup-iptables`.
//! - `tollgate-sidecar`, a native sidecar (an init container with `restartPolicy: Always`, so it
//!   starts before the app's init containers and containers and stops after them), as UID 1337
//!   with a read-only root filesystem and no capabilities.
//! - Volumes: `tollgate-identity` (projected: the ServiceAccount token for audience `tollgate`,
//!   the operator's CA from the ConfigMap the operator keeps in every namespace, and the pod's
//!   labels, which the kubelet keeps current so the sidecar notices a relabelling),
//!   `tollgate-state` (emptyDir: the last good revision), `tollgate-xtables` (emptyDir: `/run`
//!   of the init container, for the legacy iptables lock).
//! - proxy-env mode: `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY` (both cases) in every app container
//!   and app init container, unless a container sets the variable itself.
//! - Annotation `tollgate.dev/injected: <mode>`.
//! - HTTPS interception trust (unless the pod is annotated `tollgate.dev/tls-interception:
//!   disabled`, which gives the sidecar `--tls-interception=off` instead): a memory-backed
//!   `tollgate-trust` volume where the sidecar writes the pod CA and a bundle
//!   (`--trust-dir`) before its startup probe passes, mounted read-only in every app container
//!   and app init container, with `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`
//!   (the bundle) and `NODE_EXTRA_CA_CERTS` (the CA) unless a container sets one itself, and
//!   `JAVA_TOOL_OPTIONS` naming the PKCS#12 trust store (appended to the container's own value
//!   unless that names a trust store already).
//!
//! A pod that already has `tollgate-sidecar` among its init containers is left as it is, so
//! injecting is idempotent (a re-submitted or copied injected pod passes unchanged).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapProjection, Container, ContainerPort, DownwardAPIProjection,
    DownwardAPIVolumeFile, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

/// Pod annotation: `"true"` opts a pod in (in any namespace), `"false"` opts it out.
pub const INJECT_ANNOTATION: &str = "tollgate.dev/inject";
/// Namespace label (value [`NAMESPACE_ENABLED`]): every pod in the namespace is injected.
pub const NAMESPACE_LABEL: &str = "tollgate.dev/inject";
pub const NAMESPACE_ENABLED: &str = "enabled";
/// Pod annotation choosing the [`Mode`].
pub const INTERCEPTION_ANNOTATION: &str = "tollgate.dev/interception";
/// Set on injected pods, to the mode.
pub const INJECTED_ANNOTATION: &str = "tollgate.dev/injected";
/// Pod annotation: `disabled` turns the sidecar's TLS interception off for the pod
/// (`enabled`, the default, keeps it).
pub const TLS_INTERCEPTION_ANNOTATION: &str = "tollgate.dev/tls-interception";
pub const TRUST_VOLUME: &str = "tollgate-trust";
/// Where the sidecar writes, and app containers read, the pod CA and the bundle.
pub const TRUST_DIR: &str = "/var/run/tollgate/trust";

pub const SIDECAR_CONTAINER: &str = "tollgate-sidecar";
pub const INIT_CONTAINER: &str = "tollgate-init";
pub const IDENTITY_VOLUME: &str = "tollgate-identity";
pub const STATE_VOLUME: &str = "tollgate-state";
pub const XTABLES_VOLUME: &str = "tollgate-xtables";
/// Where the token and CA are mounted (the sidecar's default `--token-file`/`--operator-ca`).
pub const IDENTITY_DIR: &str = "/var/run/secrets/tollgate";
pub const STATE_DIR: &str = "/var/lib/tollgate";
/// Audience of the projected token (what the operator's TokenReview asks for).
pub const TOKEN_AUDIENCE: &str = "tollgate";
/// Key of the CA in the ConfigMap and file name in [`IDENTITY_DIR`].
pub const CA_KEY: &str = "ca.crt";
/// The pod's labels (downward API) in [`IDENTITY_DIR`].
pub const LABELS_FILE: &str = "labels";
const ADMIN_PORT_NAME: &str = "tollgate-admin";

/// The namespaces never injected, whatever their labels or the pods' annotations.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// How the app's traffic reaches the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Transparent: iptables rules redirect the app's outbound TCP to the sidecar.
    Iptables,
    /// `HTTP_PROXY`/`HTTPS_PROXY` in the app's environment.
    ProxyEnv,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::ProxyEnv => "proxy-env",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "iptables" => Some(Mode::Iptables),
            "proxy-env" => Some(Mode::ProxyEnv),
            _ => None,
        }
    }
}

/// Which webhook of the configuration called: the API server routes pods of namespaces
/// labelled `tollgate.dev/inject=enabled` to [`Scope::Namespace`] and every other pod (not in
/// an excluded namespace) to [`Scope::Pod`], where only the annotation opts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Namespace,
    Pod,
}

/// Everything the injected containers are made of (from the operator's flags).
#[derive(Clone, Debug)]
pub struct InjectConfig {
    pub sidecar_image: String,
    pub init_image: String,
    pub image_pull_policy: Option<String>,
    /// `https://…` the sidecar subscribes to.
    pub operator_url: String,
    /// ConfigMap (in the pod's namespace) holding the operator's CA under `ca.crt`.
    pub ca_configmap: String,
    pub uid: i64,
    pub proxy_port: u16,
    pub transparent_port: u16,
    pub admin_port: u16,
    /// Destination ports redirected in iptables mode.
    pub intercept_ports: Vec<u16>,
    /// Destinations never redirected (besides the operator's own addresses).
    pub exclude_cidrs: Vec<String>,
    pub default_mode: Mode,
    pub no_proxy: String,
    pub sidecar_resources: ResourceRequirements,
    pub init_resources: ResourceRequirements,
    pub token_expiration_seconds: i64,
    /// Extra arguments for the sidecar (e.g. `--unknown-hosts=deny`).
    pub sidecar_args: Vec<String>,
    /// Namespaces never injected: the system ones, the operator's, and any added by flag.
    pub excluded_namespaces: BTreeSet<String>,
    /// How long the app may wait for the sidecar's first revision, and what happens then.
    pub startup: StartupGate,
    /// OTLP export and scrape annotations of injected sidecars.
    pub telemetry: SidecarTelemetry,
}

/// How injected sidecars are observed: their OTLP settings (the standard `OTEL_*` variables of
/// the sidecar container) and whether the pod is annotated for annotation-driven scraping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarTelemetry {
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; `None`: no `OTEL_*` variable is set (no export).
    pub otlp_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub otlp_protocol: Option<String>,
    /// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
    pub sampler: Option<String>,
    pub sampler_arg: Option<String>,
    /// `OTEL_SERVICE_NAME`.
    pub service_name: Option<String>,
    /// Resource attributes after the pod's own (`k8s.pod.name`, `k8s.namespace.name`).
    pub resource_attributes: Vec<(String, String)>,
    /// Annotate the pod `prometheus.io/scrape`, `prometheus.io/port`, `prometheus.io/path`.
    pub scrape_annotations: bool,
}

/// The app's containers start only once the sidecar's startup probe passes. The probe asks
/// `/readyz`, ready only once a revision (received or persisted) is in force, every second
/// for at most `timeout_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartupGate {
    pub timeout_seconds: i32,
    pub on_timeout: OnTimeout,
}

/// What happens when no revision is in force within [`StartupGate::timeout_seconds`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnTimeout {
    /// The probe fails: the kubelet restarts the sidecar and the app never starts ungoverned.
    Fail,
    /// The sidecar reports started anyway (`--startup-fail-open-after`), logged as a warning,
    /// and the app starts with no policy in force.
    Open,
}

/// The app's own containers, by the pod field that holds them (JSON patch paths name it).
fn app_container_groups(
    spec: &k8s_openapi::api::core::v1::PodSpec,
) -> [(&'static str, &[Container]); 2] {
    [
        (
            "initContainers",
            spec.init_containers.as_deref().unwrap_or(&[]),
        ),
        ("containers", spec.containers.as_slice()),
    ]
}

/// Slack between the sidecar opening and the probe giving up, in fail-open mode: the probe's
/// bound must not expire first.
const FAIL_OPEN_SLACK_SECONDS: i32 = 15;
/// Size of the memory-backed volume that holds the last good revision.
pub const STATE_SIZE_LIMIT: &str = "16Mi";

/// Why a pod is not injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    ExcludedNamespace,
    OptedOut,
    NotOptedIn,
    AlreadyInjected,
    HostNetwork,
}

impl Skip {
    /// Label value in `tollgate_operator_webhook_admissions_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Skip::ExcludedNamespace => "excluded-namespace",
            Skip::OptedOut => "opted-out",
            Skip::NotOptedIn => "not-opted-in",
            Skip::AlreadyInjected => "already-injected",
            Skip::HostNetwork => "host-network",
        }
    }
}

/// What to do with a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Inject(Mode),
    Skip(Skip),
    /// Refuse the pod: it asks for something that cannot be done (the message says what).
    Deny(String),
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// Whether `pod` already carries the sidecar: the injected annotation and our init container
/// (a container merely named like ours is refused by [`defeats_isolation`]).
pub fn is_injected(pod: &Pod) -> bool {
    annotation(pod, INJECTED_ANNOTATION).is_some()
        && pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|ics| ics.iter().any(|c| c.name == SIDECAR_CONTAINER))
}

/// Decides for `pod`, created in `namespace`, reaching the webhook of `scope`.
pub fn decide(cfg: &InjectConfig, scope: Scope, namespace: &str, pod: &Pod) -> Decision {
    // Defence in depth: the webhook configuration's namespaceSelector excludes these too.
    if cfg.excluded_namespaces.contains(namespace) {
        return Decision::Skip(Skip::ExcludedNamespace);
    }
    if is_injected(pod) {
        return Decision::Skip(Skip::AlreadyInjected);
    }
    match annotation(pod, INJECT_ANNOTATION) {
        Some("false") => return Decision::Skip(Skip::OptedOut),
        Some("true") => {}
        None if scope == Scope::Namespace => {}
        None => return Decision::Skip(Skip::NotOptedIn),
        Some(other) => {
            return Decision::Deny(format!(
                "annotation {INJECT_ANNOTATION}: {other:?} is neither \"true\" nor \"false\""
            ));
        }
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Decision::Skip(Skip::HostNetwork);
    }
    if let Some(message) = defeats_isolation(cfg, pod) {
        return Decision::Deny(message);
    }
    match annotation(pod, INTERCEPTION_ANNOTATION) {
        None => Decision::Inject(cfg.default_mode),
        Some(m) => match Mode::parse(m) {
            Some(mode) => Decision::Inject(mode),
            None => Decision::Deny(format!(
                "annotation {INTERCEPTION_ANNOTATION}: {m:?} is not a mode (iptables or proxy-env)"
            )),
        },
    }
}

/// Why the sidecar could not govern `pod` once injected, if it could not: an app container
/// running as the sidecar's UID (its traffic would be exempt from interception), a shared
/// process namespace (the app could read the sidecar's memory: its CA key and credentials),
/// a volume named like ours or a mount of one (the app could read the token or the revision
/// with its credentials), a container named like ours.
pub fn defeats_isolation(cfg: &InjectConfig, pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.share_process_namespace == Some(true) {
        return Some(
            "tollgate: spec.shareProcessNamespace is true: the app could read the sidecar's \
             memory (its CA key and credentials); unset it or opt the pod out"
                .to_string(),
        );
    }
    let ours = [IDENTITY_VOLUME, STATE_VOLUME, XTABLES_VOLUME];
    if let Some(v) = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| ours.contains(&v.name.as_str()))
    {
        return Some(format!(
            "tollgate: volume {:?} is reserved for the injected sidecar; rename it",
            v.name
        ));
    }
    let pod_uid = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    for c in containers {
        if c.name == SIDECAR_CONTAINER || c.name == INIT_CONTAINER {
            return Some(format!(
                "tollgate: container name {:?} is reserved for the injected sidecar; rename it",
                c.name
            ));
        }
        let uid = c
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or(pod_uid);
        if uid == Some(cfg.uid) {
            return Some(format!(
                "tollgate: container {:?} runs as UID {}, the sidecar's: its traffic would \
                 bypass the sidecar; choose another runAsUser",
                c.name, cfg.uid
            ));
        }
        if let Some(m) = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| ours.contains(&m.name.as_str()))
        {
            return Some(format!(
                "tollgate: container {:?} mounts volume {:?}, reserved for the injected sidecar",
                c.name, m.name
            ));
        }
    }
    None
}

/// The injection as JSON patch operations, and warnings for the user (variables a container
/// sets itself). `operator_cidrs` are the operator's current addresses, exempted from
/// interception like `cfg.exclude_cidrs`.
pub fn patch(
    cfg: &InjectConfig,
    pod: &Pod,
    mode: Mode,
    operator_cidrs: &[String],
) -> (Vec<Value>, Vec<String>) {
    let mut ops = Vec::new();
    let mut warnings = Vec::new();
    let spec = pod.spec.clone().unwrap_or_default();

    // Annotation.
    if pod.metadata.annotations.is_none() {
        ops.push(add(
            "/metadata/annotations",
            json!({ INJECTED_ANNOTATION: mode.as_str() }),
        ));
    } else {
        ops.push(add(
            &format!("/metadata/annotations/{}", escape(INJECTED_ANNOTATION)),
            json!(mode.as_str()),
        ));
    }

    // Proxy variables, before our init containers shift the app's init containers' indices.
    if mode == Mode::ProxyEnv {
        let vars = proxy_env(cfg);
        let groups = app_container_groups(&spec);
        for (field, containers) in groups {
            for (i, c) in containers.iter().enumerate() {
                let own: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
                let missing: Vec<&EnvVar> = vars
                    .iter()
                    .filter(|v| !own.contains(v.name.as_str()))
                    .collect();
                for v in vars.iter().filter(|v| own.contains(v.name.as_str())) {
                    warnings.push(format!(
                        "tollgate: container {:?} sets {} itself; left unchanged",
                        c.name, v.name
                    ));
                }
                if missing.is_empty() {
                    continue;
                }
                let base = format!("/spec/{field}/{i}/env");
                if c.env.is_none() {
                    ops.push(add(&base, to_value(&missing)));
                } else {
                    for v in missing {
                        ops.push(add(&format!("{base}/-"), to_value(v)));
                    }
                }
            }
        }
    }

    let interception = tls_interception(pod, &mut warnings);
    if interception {
        trust_ops(&spec, mode, &mut ops, &mut warnings);
    }

    // Volumes.
    let mut volumes = volumes(cfg, mode);
    if interception {
        volumes.push(trust_volume());
    }
    if spec.volumes.is_none() {
        ops.push(add("/spec/volumes", to_value(&volumes)));
    } else {
        for v in &volumes {
            ops.push(add("/spec/volumes/-", to_value(v)));
        }
    }

    // Our init containers go first: the rules before anything runs, the sidecar before the
    // app's own init containers so they are proxied too.
    let mut ours = Vec::new();
    if mode == Mode::Iptables {
        ours.push(init_container(cfg, operator_cidrs));
    }
    let mut sidecar = sidecar_container(cfg, mode);
    sidecar_trust(&mut sidecar, interception);
    telemetry(cfg, pod, &mut sidecar, &mut ops, &mut warnings);
    ours.push(sidecar);
    if spec.init_containers.is_none() {
        ops.push(add("/spec/initContainers", to_value(&ours)));
    } else {
        for c in ours.iter().rev() {
            ops.push(add("/spec/initContainers/0", to_value(c)));
        }
    }
    (ops, warnings)
}

// === HTTPS interception trust ===

/// Whether the pod keeps TLS interception (a value other than `enabled` or `disabled` is
/// reported and keeps it).
fn tls_interception(pod: &Pod, warnings: &mut Vec<String>) -> bool {
    match annotation(pod, TLS_INTERCEPTION_ANNOTATION) {
        None | Some("enabled") => true,
        Some("disabled") => false,
        Some(other) => {
            warnings.push(format!(
                "tollgate: annotation {TLS_INTERCEPTION_ANNOTATION}: {other:?} is neither \"enabled\" nor \"disabled\"; interception stays enabled"
            ));
            true
        }
    }
}

/// The variables that point app runtimes at the trust files.
fn trust_env() -> Vec<EnvVar> {
    let bundle = format!("{TRUST_DIR}/ca-bundle.crt");
    let ca = format!("{TRUST_DIR}/ca.crt");
    [
        ("SSL_CERT_FILE", &bundle),
        ("REQUESTS_CA_BUNDLE", &bundle),
        ("CURL_CA_BUNDLE", &bundle),
        ("NODE_EXTRA_CA_CERTS", &ca),
    ]
    .into_iter()
    .map(|(name, value)| EnvVar {
        name: name.to_string(),
        value: Some(value.clone()),
        value_from: None,
    })
    .collect()
}

/// The trust mount and variables for every app container and app init container; a variable
/// a container sets itself is left as it is (and reported).
fn trust_ops(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    mode: Mode,
    ops: &mut Vec<Value>,
    warnings: &mut Vec<String>,
) {
    let vars = trust_env();
    let mount = VolumeMount {
        name: TRUST_VOLUME.to_string(),
        mount_path: TRUST_DIR.to_string(),
        read_only: Some(true),
        ..Default::default()
    };
    let groups = app_container_groups(spec);
    for (field, containers) in groups {
        for (i, c) in containers.iter().enumerate() {
            let own: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
            for v in vars.iter().filter(|v| own.contains(v.name.as_str())) {
                warnings.push(format!(
                    "tollgate: container {:?} sets {} itself; left unchanged",
                    c.name, v.name
                ));
            }
            let mut missing: Vec<&EnvVar> = vars
                .iter()
                .filter(|v| !own.contains(v.name.as_str()))
                .collect();
            let base = format!("/spec/{field}/{i}/env");
            let java = java_tool_options(c, &base, ops, warnings);
            if let Some(v) = &java {
                missing.push(v);
            }
            // In proxy-env mode the proxy variables created the list already.
            let has_env = c.env.is_some() || mode == Mode::ProxyEnv;
            if !has_env && !missing.is_empty() {
                ops.push(add(&base, to_value(&missing)));
            } else {
                for v in missing {
                    ops.push(add(&format!("{base}/-"), to_value(v)));
                }
            }
            let mounts = format!("/spec/{field}/{i}/volumeMounts");
            if c.volume_mounts.is_none() {
                ops.push(add(&mounts, json!([to_value(&mount)])));
            } else {
                ops.push(add(&format!("{mounts}/-"), to_value(&mount)));
            }
        }
    }
}

/// What `JAVA_TOOL_OPTIONS` gets: the pod's trust store (certificates only, no password).
pub const JAVA_TRUST_OPTIONS: &str = "-Djavax.net.ssl.trustStore=/var/run/tollgate/trust/ca-bundle.p12 -Djavax.net.ssl.trustStoreType=PKCS12";

/// Java's trust store: `JAVA_TOOL_OPTIONS` to add (the container has none), or a patch that
/// appends [`JAVA_TRUST_OPTIONS`] to the container's own value. A value that already names a
/// trust store, or comes from a reference, is left as it is (and reported).
fn java_tool_options(
    c: &Container,
    base: &str,
    ops: &mut Vec<Value>,
    warnings: &mut Vec<String>,
) -> Option<EnvVar> {
    const NAME: &str = "JAVA_TOOL_OPTIONS";
    let Some((j, own)) = c
        .env
        .iter()
        .flatten()
        .enumerate()
        .find(|(_, e)| e.name == NAME)
    else {
        return Some(EnvVar {
            name: NAME.to_string(),
            value: Some(JAVA_TRUST_OPTIONS.to_string()),
            value_from: None,
        });
    };
    let value = own.value.as_deref().unwrap_or_default();
    if own.value_from.is_some() || value.contains("-Djavax.net.ssl.trustStore") {
        warnings.push(format!(
            "tollgate: container {:?} sets {NAME} {}; the pod's Java trust store is not added",
            c.name,
            if own.value_from.is_some() {
                "from a reference"
            } else {
                "with its own trust store"
            }
        ));
        return None;
    }
    let appended = if value.trim().is_empty() {
        JAVA_TRUST_OPTIONS.to_string()
    } else {
        format!("{value} {JAVA_TRUST_OPTIONS}")
    };
    ops.push(json!({"op": "replace", "path": format!("{base}/{j}/value"), "value": appended}));
    None
}

/// Memory-backed: the files are public certificates, but nothing of the pod's TLS touches
/// the node's disk.
fn trust_volume() -> Volume {
    Volume {
        name: TRUST_VOLUME.to_string(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".to_string()),
            size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                "1Mi".to_string(),
            )),
        }),
        ..Default::default()
    }
}

/// `--trust-dir` and its writable mount, or `--tls-interception=off`.
fn sidecar_trust(sidecar: &mut Container, interception: bool) {
    let args = sidecar.args.get_or_insert_with(Vec::new);
    if !interception {
        args.push("--tls-interception=off".to_string());
        return;
    }
    args.push(format!("--trust-dir={TRUST_DIR}"));
    sidecar
        .volume_mounts
        .get_or_insert_with(Vec::new)
        .push(VolumeMount {
            name: TRUST_VOLUME.to_string(),
            mount_path: TRUST_DIR.to_string(),
            ..Default::default()
        });
}

// === telemetry ===

/// Annotations for annotation-driven Prometheus scrape configurations.
pub const SCRAPE_ANNOTATIONS: [&str; 3] = [
    "prometheus.io/scrape",
    "prometheus.io/port",
    "prometheus.io/path",
];

/// The sidecar's `OTEL_*` variables (after `POD_NAME`/`POD_NAMESPACE`, which the resource
/// attributes refer to) and the pod's scrape annotations. An annotation the pod sets itself
/// is left as it is (and reported): the pod's own metrics may be what it points at.
fn telemetry(
    cfg: &InjectConfig,
    pod: &Pod,
    sidecar: &mut Container,
    ops: &mut Vec<Value>,
    warnings: &mut Vec<String>,
) {
    let t = &cfg.telemetry;
    if let Some(endpoint) = &t.otlp_endpoint {
        let mut attributes = vec![
            "k8s.pod.name=$(POD_NAME)".to_string(),
            "k8s.namespace.name=$(POD_NAMESPACE)".to_string(),
        ];
        // `$` would start a variable reference for the kubelet.
        attributes.extend(
            t.resource_attributes
                .iter()
                .map(|(k, v)| format!("{k}={v}").replace('$', "$$")),
        );
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", Some(endpoint.clone())),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", t.otlp_protocol.clone()),
            ("OTEL_TRACES_SAMPLER", t.sampler.clone()),
            ("OTEL_TRACES_SAMPLER_ARG", t.sampler_arg.clone()),
            ("OTEL_SERVICE_NAME", t.service_name.clone()),
            ("OTEL_RESOURCE_ATTRIBUTES", Some(attributes.join(","))),
        ];
        let env = sidecar.env.get_or_insert_with(Vec::new);
        for (name, value) in vars {
            if let Some(value) = value {
                env.push(EnvVar {
                    name: name.to_string(),
                    value: Some(value),
                    value_from: None,
                });
            }
        }
    }
    if t.scrape_annotations {
        let port = cfg.admin_port.to_string();
        for (key, value) in SCRAPE_ANNOTATIONS
            .into_iter()
            .zip(["true", &port, "/metrics"])
        {
            if annotation(pod, key).is_some() {
                warnings.push(format!(
                    "tollgate: the pod sets annotation {key} itself; left unchanged, so the sidecar's metrics may not be scraped"
                ));
                continue;
            }
            ops.push(add(
                &format!("/metadata/annotations/{}", escape(key)),
                json!(value),
            ));
        }
    }
}

fn add(path: &str, value: Value) -> Value {
    json!({ "op": "add", "path": path, "value": value })
}

/// RFC 6901: `~` → `~0`, `/` → `~1`.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // k8s-openapi types and plain vectors of them always serialize.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn proxy_env(cfg: &InjectConfig) -> Vec<EnvVar> {
    let url = format!("http://127.0.0.1:{}", cfg.proxy_port);
    [
        ("HTTP_PROXY", &url),
        ("http_proxy", &url),
        ("HTTPS_PROXY", &url),
        ("https_proxy", &url),
        ("NO_PROXY", &cfg.no_proxy),
        ("no_proxy", &cfg.no_proxy),
    ]
    .into_iter()
    .map(|(name, value)| EnvVar {
        name: name.to_string(),
        value: Some(value.clone()),
        value_from: None,
    })
    .collect()
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

fn sidecar_container(cfg: &InjectConfig, mode: Mode) -> Container {
    let mut args = vec![
        format!("--operator={}", cfg.operator_url),
        format!("--token-file={IDENTITY_DIR}/token"),
        format!("--operator-ca={IDENTITY_DIR}/{CA_KEY}"),
        format!("--labels-file={IDENTITY_DIR}/{LABELS_FILE}"),
        format!("--state-file={STATE_DIR}/snapshot.json"),
        format!("--listen=127.0.0.1:{}", cfg.proxy_port),
        // On the pod IP: the kubelet's startup probe and metrics scrapers reach it there.
        // `/config` answers loopback peers only.
        format!("--admin=0.0.0.0:{}", cfg.admin_port),
    ];
    if mode == Mode::Iptables {
        args.push(format!("--transparent=127.0.0.1:{}", cfg.transparent_port));
    }
    args.extend(startup_args(cfg));
    args.extend(cfg.sidecar_args.iter().cloned());
    Container {
        name: SIDECAR_CONTAINER.to_string(),
        image: Some(cfg.sidecar_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        command: Some(vec!["tollgate-sidecar".to_string()]),
        args: Some(args),
        restart_policy: Some("Always".to_string()),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.to_string()),
            container_port: i32::from(cfg.admin_port),
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }]),
        resources: Some(cfg.sidecar_resources.clone()),
        startup_probe: Some(startup_probe(cfg)),
        security_context: Some(SecurityContext {
            run_as_user: Some(cfg.uid),
            run_as_group: Some(cfg.uid),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".to_string()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: IDENTITY_VOLUME.to_string(),
                mount_path: IDENTITY_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: STATE_VOLUME.to_string(),
                mount_path: STATE_DIR.to_string(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

/// The sidecar's startup probe: it gates the app's containers (a native sidecar's startup
/// probe must pass before the next container starts). Fail closed, it asks `/readyz` and
/// gives up after the bound; fail open, it asks `/startupz`, which the sidecar reports ready
/// after the bound even without a revision.
fn startup_probe(cfg: &InjectConfig) -> Probe {
    let gate = cfg.startup;
    let (path, failure_threshold) = match gate.on_timeout {
        OnTimeout::Fail => ("/readyz", gate.timeout_seconds),
        OnTimeout::Open => (
            "/startupz",
            gate.timeout_seconds.saturating_add(FAIL_OPEN_SLACK_SECONDS),
        ),
    };
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(cfg.admin_port)),
            ..Default::default()
        }),
        period_seconds: Some(1),
        timeout_seconds: Some(1),
        failure_threshold: Some(failure_threshold.max(1)),
        ..Default::default()
    }
}

/// The sidecar's flags for the startup gate.
fn startup_args(cfg: &InjectConfig) -> Vec<String> {
    match cfg.startup.on_timeout {
        OnTimeout::Fail => Vec::new(),
        OnTimeout::Open => vec![format!(
            "--startup-fail-open-after={}s",
            cfg.startup.timeout_seconds
        )],
    }
}

fn init_container(cfg: &InjectConfig, operator_cidrs: &[String]) -> Container {
    let mut args = vec![
        "setup-iptables".to_string(),
        format!("--proxy-uid={}", cfg.uid),
        format!("--listener-port={}", cfg.transparent_port),
        format!(
            "--ports={}",
            cfg.intercept_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    ];
    let mut exclude: Vec<&str> = Vec::new();
    for c in operator_cidrs.iter().chain(&cfg.exclude_cidrs) {
        if !exclude.contains(&c.as_str()) {
            exclude.push(c);
        }
    }
    if !exclude.is_empty() {
        args.push(format!("--exclude-cidrs={}", exclude.join(",")));
    }
    Container {
        name: INIT_CONTAINER.to_string(),
        image: Some(cfg.init_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        command: Some(vec!["tollgate-sidecar".to_string()]),
        args: Some(args),
        resources: Some(cfg.init_resources.clone()),
        // Root in the pod's network namespace, with only what iptables needs: NET_ADMIN, and
        // NET_RAW for the legacy backend (docs/interception.md).
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]),
                drop: Some(vec!["ALL".to_string()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        // The legacy backend's lock file lives in /run.
        volume_mounts: Some(vec![VolumeMount {
            name: XTABLES_VOLUME.to_string(),
            mount_path: "/run".to_string(),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn volumes(cfg: &InjectConfig, mode: Mode) -> Vec<Volume> {
    let mut v = vec![
        Volume {
            name: IDENTITY_VOLUME.to_string(),
            projected: Some(ProjectedVolumeSource {
                // Only the sidecar mounts it; its UID is not root.
                default_mode: Some(0o444),
                sources: Some(vec![
                    VolumeProjection {
                        service_account_token: Some(ServiceAccountTokenProjection {
                            audience: Some(TOKEN_AUDIENCE.to_string()),
                            expiration_seconds: Some(cfg.token_expiration_seconds),
                            path: "token".to_string(),
                        }),
                        ..Default::default()
                    },
                    VolumeProjection {
                        config_map: Some(ConfigMapProjection {
                            name: cfg.ca_configmap.clone(),
                            items: Some(vec![KeyToPath {
                                key: CA_KEY.to_string(),
                                path: CA_KEY.to_string(),
                                mode: None,
                            }]),
                            optional: Some(false),
                        }),
                        ..Default::default()
                    },
                    VolumeProjection {
                        downward_api: Some(DownwardAPIProjection {
                            items: Some(vec![DownwardAPIVolumeFile {
                                path: LABELS_FILE.to_string(),
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: "metadata.labels".to_string(),
                                    api_version: None,
                                }),
                                ..Default::default()
                            }]),
                        }),
                        ..Default::default()
                    },
                ]),
            }),
            ..Default::default()
        },
        state_volume(),
    ];
    if mode == Mode::Iptables {
        v.push(Volume {
            name: XTABLES_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
    }
    v
}

/// The last good revision holds the integrations' credentials: kept in memory (tmpfs), never
/// on the node's disk, and bounded.
fn state_volume() -> Volume {
    Volume {
        name: STATE_VOLUME.to_string(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: Some("Memory".to_string()),
            size_limit: Some(Quantity(STATE_SIZE_LIMIT.to_string())),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    pub(crate) fn config() -> InjectConfig {
        InjectConfig {
            sidecar_image: "ghcr.io/tollgate-dev/tollgate-sidecar:1".into(),
            init_image: "ghcr.io/tollgate-dev/tollgate-sidecar:1".into(),
            image_pull_policy: Some("IfNotPresent".into()),
            operator_url: "https://tollgate-operator.tollgate-system.svc:8443".into(),
            ca_configmap: "tollgate-operator-ca".into(),
            uid: 1337,
            proxy_port: 15080,
            transparent_port: 15001,
            admin_port: 15090,
            intercept_ports: vec![80, 443],
            exclude_cidrs: vec!["169.254.169.254/32".into()],
            default_mode: Mode::Iptables,
            no_proxy: "localhost,127.0.0.1,.svc".into(),
            sidecar_resources: serde_json::from_value(
                json!({"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}),
            )
            .unwrap(),
            init_resources: serde_json::from_value(json!({"requests": {"cpu": "10m"}})).unwrap(),
            token_expiration_seconds: 3600,
            sidecar_args: vec!["--unknown-hosts=deny".into()],
            excluded_namespaces: ["kube-system", "kube-public", "kube-node-lease", "tollgate-system"]
                .into_iter()
                .map(String::from)
                .collect(),
            startup: StartupGate {
                timeout_seconds: 60,
                on_timeout: OnTimeout::Fail,
            },
            telemetry: SidecarTelemetry::default(),
        }
    }

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn app() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "namespace": "payments"},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}
        })
    }

    /// The pod after the patch, as the API server would apply it.
    fn injected(cfg: &InjectConfig, original: &Value, mode: Mode) -> (Value, Vec<String>) {
        let (ops, warnings) = patch(cfg, &pod(original.clone()), mode, &["10.96.0.10/32".into()]);
        let p: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
        let mut doc = original.clone();
        json_patch::patch(&mut doc, &p).unwrap();
        (doc, warnings)
    }

    fn with_annotations(mut v: Value, a: Value) -> Value {
        v["metadata"]["annotations"] = a;
        v
    }

    #[test]
    fn decisions() {
        let cfg = config();
        let d = |scope, ns: &str, v: Value| decide(&cfg, scope, ns, &pod(v));
        use Decision::*;
        assert_eq!(
            d(Scope::Namespace, "payments", app()),
            Inject(Mode::Iptables)
        );
        assert_eq!(
            d(Scope::Pod, "payments", app()),
            Skip(self::Skip::NotOptedIn)
        );
        let opted_in = with_annotations(app(), json!({INJECT_ANNOTATION: "true"}));
        assert_eq!(
            d(Scope::Pod, "payments", opted_in.clone()),
            Inject(Mode::Iptables)
        );
        let opted_out = with_annotations(app(), json!({INJECT_ANNOTATION: "false"}));
        assert_eq!(
            d(Scope::Namespace, "payments", opted_out),
            Skip(self::Skip::OptedOut)
        );
        for ns in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "tollgate-system",
        ] {
            assert_eq!(
                d(Scope::Namespace, ns, opted_in.clone()),
                Skip(self::Skip::ExcludedNamespace),
                "{ns}"
            );
        }
        let proxy_env = with_annotations(app(), json!({INTERCEPTION_ANNOTATION: "proxy-env"}));
        assert_eq!(
            d(Scope::Namespace, "payments", proxy_env),
            Inject(Mode::ProxyEnv)
        );
        let bad_mode = with_annotations(app(), json!({INTERCEPTION_ANNOTATION: "ebpf"}));
        assert!(
            matches!(d(Scope::Namespace, "payments", bad_mode), Deny(m) if m.contains(INTERCEPTION_ANNOTATION))
        );
        let bad_inject = with_annotations(app(), json!({INJECT_ANNOTATION: "yes"}));
        assert!(matches!(d(Scope::Pod, "payments", bad_inject), Deny(m) if m.contains("\"yes\"")));
        let mut host = app();
        host["spec"]["hostNetwork"] = json!(true);
        assert_eq!(
            d(Scope::Namespace, "payments", host),
            Skip(self::Skip::HostNetwork)
        );
        let (done, _) = injected(&cfg, &app(), Mode::Iptables);
        assert_eq!(
            d(Scope::Namespace, "payments", done),
            Skip(self::Skip::AlreadyInjected)
        );
    }

    #[test]
    fn pods_that_defeat_isolation_are_refused_saying_why() {
        let cfg = config();
        let refused = |edit: &dyn Fn(&mut Value)| {
            let mut p = app();
            p["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m:1"}]);
            edit(&mut p);
            let messages: Vec<String> = [Scope::Namespace, Scope::Pod]
                .into_iter()
                .map(|scope| {
                    let mut p = p.clone();
                    p["metadata"]["annotations"] = json!({INJECT_ANNOTATION: "true"});
                    match decide(&cfg, scope, "payments", &pod(p)) {
                        Decision::Deny(m) => m,
                        other => panic!("{scope:?}: {other:?}"),
                    }
                })
                .collect();
            assert_eq!(messages[0], messages[1], "the same in both scopes");
            messages[0].clone()
        };
        let m = refused(&|p| {
            p["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 1337})
        });
        assert!(m.contains("\"app\" runs as UID 1337"), "{m}");
        let m = refused(&|p| p["spec"]["securityContext"] = json!({"runAsUser": 1337}));
        assert!(m.contains("\"migrate\" runs as UID 1337"), "{m}");
        let m = refused(&|p| p["spec"]["shareProcessNamespace"] = json!(true));
        assert!(m.contains("spec.shareProcessNamespace"), "{m}");
        let m = refused(&|p| {
            p["spec"]["containers"][0]["volumeMounts"] =
                json!([{"name": STATE_VOLUME, "mountPath": "/x"}])
        });
        assert!(
            m.contains("\"app\" mounts volume \"tollgate-state\""),
            "{m}"
        );
        let m =
            refused(&|p| p["spec"]["volumes"] = json!([{"name": IDENTITY_VOLUME, "emptyDir": {}}]));
        assert!(
            m.contains("volume \"tollgate-identity\" is reserved"),
            "{m}"
        );
        let m = refused(&|p| p["spec"]["containers"][0]["name"] = json!(SIDECAR_CONTAINER));
        assert!(
            m.contains("container name \"tollgate-sidecar\" is reserved"),
            "{m}"
        );
        let m = refused(&|p| p["spec"]["initContainers"][0]["name"] = json!(SIDECAR_CONTAINER));
        assert!(
            m.contains("container name \"tollgate-sidecar\" is reserved"),
            "{m}"
        );

        // The pod's own UID is overridden by the container's.
        let mut ok = app();
        ok["spec"]["securityContext"] = json!({"runAsUser": 1337});
        ok["spec"]["containers"][0]["securityContext"] = json!({"runAsUser": 1000});
        assert_eq!(
            decide(&cfg, Scope::Namespace, "payments", &pod(ok)),
            Decision::Inject(Mode::Iptables)
        );
    }

    #[test]
    fn the_startup_probe_waits_for_a_revision_within_the_bound() {
        let mut cfg = config();
        let (p, _) = injected(&cfg, &app(), Mode::Iptables);
        let side = &p["spec"]["initContainers"][1];
        assert_eq!(
            side["startupProbe"],
            json!({"httpGet": {"path": "/readyz", "port": 15090}, "periodSeconds": 1,
                   "timeoutSeconds": 1, "failureThreshold": 60})
        );
        assert!(
            !side["args"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a.as_str().unwrap().starts_with("--startup-fail-open-after"))
        );

        cfg.startup = StartupGate {
            timeout_seconds: 20,
            on_timeout: OnTimeout::Open,
        };
        let (p, _) = injected(&cfg, &app(), Mode::Iptables);
        let side = &p["spec"]["initContainers"][1];
        assert_eq!(side["startupProbe"]["httpGet"]["path"], "/startupz");
        assert_eq!(side["startupProbe"]["failureThreshold"], 35);
        assert!(
            side["args"]
                .as_array()
                .unwrap()
                .contains(&json!("--startup-fail-open-after=20s"))
        );
    }

    #[test]
    fn iptables_mode_adds_the_rules_container_then_the_native_sidecar() {
        let cfg = config();
        let (p, warnings) = injected(&cfg, &app(), Mode::Iptables);
        assert!(warnings.is_empty());
        assert_eq!(
            p["metadata"]["annotations"][INJECTED_ANNOTATION],
            "iptables"
        );
        let inits = p["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits.len(), 2);

        let init = &inits[0];
        assert_eq!(init["name"], INIT_CONTAINER);
        assert_eq!(init["command"], json!(["tollgate-sidecar"]));
        assert_eq!(
            init["args"],
            json!([
                "setup-iptables",
                "--proxy-uid=1337",
                "--listener-port=15001",
                "--ports=80,443",
                "--exclude-cidrs=10.96.0.10/32,169.254.169.254/32"
            ])
        );
        let sc = &init["securityContext"];
        assert_eq!(sc["runAsUser"], 0);
        assert_eq!(sc["runAsNonRoot"], false);
        assert_eq!(sc["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert!(
            init.get("restartPolicy").is_none(),
            "a plain init container"
        );

        let side = &inits[1];
        assert_eq!(side["name"], SIDECAR_CONTAINER);
        assert_eq!(side["restartPolicy"], "Always");
        assert_eq!(side["image"], "ghcr.io/tollgate-dev/tollgate-sidecar:1");
        assert_eq!(
            side["args"],
            json!([
                "--operator=https://tollgate-operator.tollgate-system.svc:8443",
                "--token-file=/var/run/secrets/tollgate/token",
                "--operator-ca=/var/run/secrets/tollgate/ca.crt",
                "--labels-file=/var/run/secrets/tollgate/labels",
                "--state-file=/var/lib/tollgate/snapshot.json",
                "--listen=127.0.0.1:15080",
                "--admin=0.0.0.0:15090",
                "--transparent=127.0.0.1:15001",
                "--unknown-hosts=deny",
                "--trust-dir=/var/run/tollgate/trust"
            ])
        );
        let sc = &side["securityContext"];
        assert_eq!(sc["runAsUser"], 1337);
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
        assert_eq!(
            side["resources"]["requests"],
            json!({"cpu": "20m", "memory": "32Mi"})
        );
        assert_eq!(
            side["env"],
            json!([
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
            ])
        );
        assert_eq!(side["startupProbe"]["httpGet"]["port"], 15090);

        let vols = p["spec"]["volumes"].as_array().unwrap();
        let names: Vec<&str> = vols.iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [IDENTITY_VOLUME, STATE_VOLUME, XTABLES_VOLUME, TRUST_VOLUME]
        );
        assert_eq!(
            vols[0]["projected"]["sources"],
            json!([
                {"serviceAccountToken": {"audience": "tollgate", "expirationSeconds": 3600, "path": "token"}},
                {"configMap": {"name": "tollgate-operator-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}], "optional": false}},
                {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}
            ])
        );
        assert_eq!(
            vols[1]["emptyDir"],
            json!({"medium": "Memory", "sizeLimit": "16Mi"}),
            "the revision holds credentials: never on disk"
        );
        // The app container gets only the trust for intercepted HTTPS in this mode.
        assert_eq!(
            p["spec"]["containers"],
            json!([{
                "name": "app", "image": "app:1",
                "env": [
                    {"name": "SSL_CERT_FILE", "value": "/var/run/tollgate/trust/ca-bundle.crt"},
                    {"name": "REQUESTS_CA_BUNDLE", "value": "/var/run/tollgate/trust/ca-bundle.crt"},
                    {"name": "CURL_CA_BUNDLE", "value": "/var/run/tollgate/trust/ca-bundle.crt"},
                    {"name": "NODE_EXTRA_CA_CERTS", "value": "/var/run/tollgate/trust/ca.crt"},
                    {"name": "JAVA_TOOL_OPTIONS", "value": JAVA_TRUST_OPTIONS}
                ],
                "volumeMounts": [{"name": TRUST_VOLUME, "mountPath": TRUST_DIR, "readOnly": true}]
            }])
        );
    }

    #[test]
    fn java_trust_is_appended_to_the_apps_own_options_never_over_its_trust_store() {
        let cfg = config();
        let pod = |env: Value| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "app"},
                "spec": {"containers": [
                    {"name": "heap", "image": "app:1", "env": [{"name": "JAVA_TOOL_OPTIONS", "value": "-Xmx512m"}]},
                    {"name": "own", "image": "app:1", "env": env},
                    {"name": "none", "image": "app:1"}
                ]}
            })
        };
        let java = |c: &Value| {
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["name"] == "JAVA_TOOL_OPTIONS")
                .cloned()
                .collect::<Vec<_>>()
        };
        let mine = json!([{"name": "JAVA_TOOL_OPTIONS", "value": "-Djavax.net.ssl.trustStore=/etc/mine.jks"}]);
        let (p, warnings) = injected(&cfg, &pod(mine.clone()), Mode::Iptables);
        let cs = &p["spec"]["containers"];
        assert_eq!(
            java(&cs[0]),
            [
                json!({"name": "JAVA_TOOL_OPTIONS", "value": format!("-Xmx512m {JAVA_TRUST_OPTIONS}")})
            ]
        );
        assert_eq!(java(&cs[1]), mine.as_array().unwrap().clone());
        assert_eq!(
            java(&cs[2]),
            [json!({"name": "JAVA_TOOL_OPTIONS", "value": JAVA_TRUST_OPTIONS})]
        );
        assert_eq!(
            warnings,
            [
                "tollgate: container \"own\" sets JAVA_TOOL_OPTIONS with its own trust store; the pod's Java trust store is not added"
            ]
        );

        let referenced = json!([{"name": "JAVA_TOOL_OPTIONS", "valueFrom": {"configMapKeyRef": {"name": "jvm", "key": "opts"}}}]);
        let (p, warnings) = injected(&cfg, &pod(referenced.clone()), Mode::ProxyEnv);
        assert_eq!(
            java(&p["spec"]["containers"][1]),
            referenced.as_array().unwrap().clone()
        );
        assert!(warnings[0].contains("from a reference"), "{warnings:?}");
    }

    #[test]
    fn trust_keeps_what_a_container_sets_and_a_pod_can_opt_out() {
        let cfg = config();
        let original = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app"},
            "spec": {"containers": [{
                "name": "app", "image": "app:1",
                "env": [{"name": "SSL_CERT_FILE", "value": "/etc/mine.pem"}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]
            }], "volumes": [{"name": "data", "emptyDir": {}}]}
        });
        let (p, warnings) = injected(&cfg, &original, Mode::ProxyEnv);
        let c = &p["spec"]["containers"][0];
        let env: Vec<(&str, &str)> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap(), v["value"].as_str().unwrap()))
            .collect();
        assert_eq!(env[0], ("SSL_CERT_FILE", "/etc/mine.pem"));
        assert_eq!(
            env.iter().filter(|(n, _)| *n == "SSL_CERT_FILE").count(),
            1,
            "{env:?}"
        );
        assert!(
            env.contains(&("HTTPS_PROXY", "http://127.0.0.1:15080")),
            "{env:?}"
        );
        assert!(env.contains(&("NODE_EXTRA_CA_CERTS", "/var/run/tollgate/trust/ca.crt")));
        assert_eq!(
            warnings,
            vec!["tollgate: container \"app\" sets SSL_CERT_FILE itself; left unchanged"]
        );
        assert_eq!(c["volumeMounts"][1]["name"], TRUST_VOLUME);
        let side = &p["spec"]["initContainers"][0];
        assert_eq!(side["volumeMounts"][2]["mountPath"], TRUST_DIR);
        assert!(
            side["volumeMounts"][2].get("readOnly").is_none(),
            "the sidecar writes it"
        );
        assert_eq!(p["spec"]["volumes"][3]["emptyDir"]["medium"], "Memory");

        let opted_out = with_annotations(app(), json!({TLS_INTERCEPTION_ANNOTATION: "disabled"}));
        let (p, warnings) = injected(&cfg, &opted_out, Mode::Iptables);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            p["spec"]["containers"],
            app()["spec"]["containers"],
            "untouched"
        );
        let args = p["spec"]["initContainers"][1]["args"].as_array().unwrap();
        assert_eq!(args.last().unwrap(), "--tls-interception=off");
        assert!(
            !args
                .iter()
                .any(|a| a.as_str().unwrap().starts_with("--trust-dir"))
        );
        let vols = p["spec"]["volumes"].as_array().unwrap();
        assert!(vols.iter().all(|v| v["name"] != TRUST_VOLUME));

        let typo = with_annotations(app(), json!({TLS_INTERCEPTION_ANNOTATION: "off"}));
        let (_, warnings) = injected(&cfg, &typo, Mode::Iptables);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("interception stays enabled"),
            "{warnings:?}"
        );
    }

    #[test]
    fn proxy_env_mode_sets_the_proxy_for_app_containers_and_keeps_their_own_values() {
        let cfg = config();
        let original = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "annotations": {"team": "pay"}},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "m:1"}],
                "containers": [
                    {"name": "app", "image": "app:1", "env": [{"name": "NO_PROXY", "value": "internal.example"}]},
                    {"name": "worker", "image": "w:1"}
                ],
                "volumes": [{"name": "data", "emptyDir": {}}]
            }
        });
        let (p, warnings) = injected(&cfg, &original, Mode::ProxyEnv);
        assert_eq!(
            p["metadata"]["annotations"],
            json!({"team": "pay", INJECTED_ANNOTATION: "proxy-env"})
        );
        let inits = p["spec"]["initContainers"].as_array().unwrap();
        let names: Vec<&str> = inits.iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [SIDECAR_CONTAINER, "migrate"],
            "no rules container; the sidecar first"
        );
        assert!(
            !inits[0]["args"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a.as_str().unwrap().starts_with("--transparent"))
        );
        let env = |c: &Value, name: &str| {
            c["env"]
                .as_array()
                .and_then(|e| e.iter().find(|v| v["name"] == name))
                .map(|v| v["value"].clone())
        };
        for c in [
            &inits[1],
            &p["spec"]["containers"][0],
            &p["spec"]["containers"][1],
        ] {
            for var in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
                assert_eq!(
                    env(c, var),
                    Some(json!("http://127.0.0.1:15080")),
                    "{var} in {}",
                    c["name"]
                );
            }
        }
        assert_eq!(
            env(&p["spec"]["containers"][0], "NO_PROXY"),
            Some(json!("internal.example"))
        );
        assert_eq!(
            env(&p["spec"]["containers"][1], "NO_PROXY"),
            Some(json!("localhost,127.0.0.1,.svc"))
        );
        assert_eq!(
            warnings,
            vec!["tollgate: container \"app\" sets NO_PROXY itself; left unchanged"]
        );
        let vols: Vec<&str> = p["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert_eq!(vols, ["data", IDENTITY_VOLUME, STATE_VOLUME, TRUST_VOLUME]);
    }

    #[test]
    fn app_init_containers_come_after_ours_in_order() {
        let cfg = config();
        let mut original = app();
        original["spec"]["initContainers"] =
            json!([{"name": "a", "image": "a"}, {"name": "b", "image": "b"}]);
        let (p, _) = injected(&cfg, &original, Mode::Iptables);
        let names: Vec<&str> = p["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [INIT_CONTAINER, SIDECAR_CONTAINER, "a", "b"]);
    }

    #[test]
    fn annotation_keys_are_escaped_in_paths() {
        let (ops, _) = patch(
            &config(),
            &pod(with_annotations(app(), json!({"a": "b"}))),
            Mode::Iptables,
            &[],
        );
        assert_eq!(
            ops[0],
            json!({"op": "add", "path": "/metadata/annotations/tollgate.dev~1injected", "value": "iptables"})
        );
    }

    fn sidecar_env(pod: &Value) -> Vec<(String, String)> {
        pod["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == SIDECAR_CONTAINER)
            .unwrap()["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let v = e["value"].as_str().unwrap_or("<from>");
                (e["name"].as_str().unwrap().to_string(), v.to_string())
            })
            .collect()
    }

    #[test]
    fn otlp_settings_reach_the_sidecar_only_when_an_endpoint_is_set() {
        let mut cfg = config();
        let (plain, _) = injected(&cfg, &app(), Mode::Iptables);
        assert!(
            sidecar_env(&plain)
                .iter()
                .all(|(n, _)| !n.starts_with("OTEL_"))
        );
        assert!(plain["metadata"]["annotations"]["prometheus.io/scrape"].is_null());

        cfg.telemetry = SidecarTelemetry {
            otlp_endpoint: Some("http://collector:4318".into()),
            service_name: Some("tollgate-sidecar".into()),
            resource_attributes: vec![("cost.center".into(), "a$b".into())],
            scrape_annotations: true,
            ..Default::default()
        };
        let (pod, warnings) = injected(&cfg, &app(), Mode::Iptables);
        assert!(warnings.is_empty(), "{warnings:?}");
        let env = sidecar_env(&pod);
        let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "POD_NAME",
                "POD_NAMESPACE",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_SERVICE_NAME",
                "OTEL_RESOURCE_ATTRIBUTES"
            ]
        );
        // `$` is escaped so the kubelet does not take it for a variable reference.
        assert_eq!(
            env[4].1,
            "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),cost.center=a$$b"
        );
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/port"],
            "15090"
        );

        // The app's own scrape annotation stays, reported.
        let own = with_annotations(app(), json!({"prometheus.io/path": "/app-metrics"}));
        let (pod, warnings) = injected(&cfg, &own, Mode::Iptables);
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/path"],
            "/app-metrics"
        );
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/scrape"],
            "true"
        );
        assert!(
            warnings.iter().any(|w| w.contains("prometheus.io/path")),
            "{warnings:?}"
        );
    }
}

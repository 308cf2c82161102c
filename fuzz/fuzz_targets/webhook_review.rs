//! The injection webhook: an AdmissionReview body → the decision and the JSON patch, as the
//! webhook server does it.
#![no_main]

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use libfuzzer_sys::fuzz_target;
use tollgate_operator::webhook::inject::{InjectConfig, Mode, OnTimeout, Scope, StartupGate};
use tollgate_operator::webhook::server::{review, review_json};

fn config() -> InjectConfig {
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
        sidecar_resources: Default::default(),
        init_resources: Default::default(),
        token_expiration_seconds: 3600,
        sidecar_args: vec!["--unknown-hosts=deny".into()],
        excluded_namespaces: ["kube-system", "tollgate-system"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>(),
        startup: StartupGate {
            timeout_seconds: 60,
            on_timeout: OnTimeout::Fail,
        },
        telemetry: Default::default(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(review_in) = serde_json::from_slice::<AdmissionReview<Pod>>(data) else {
        return;
    };
    let Ok(request): Result<AdmissionRequest<Pod>, _> = review_in.try_into() else {
        return;
    };
    let cfg = config();
    let cidrs = vec!["10.0.0.7/32".to_string()];
    for scope in [Scope::Namespace, Scope::Pod] {
        let (response, _outcome) = review(&cfg, scope, &cidrs, &request);
        let out = review_json(response);
        serde_json::to_vec(&out).expect("the answer serializes");
    }
});

//! Test fixtures: PartnerIntegrations, a `Context` over a `tower_test::mock` API server, and
//! a verifier that answers the calls a reconcile must make, in order.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};
use tollgate_crds::{PartnerIntegration, PartnerIntegrationSpec, PartnerIntegrationStatus};

use crate::catalog::{CatalogHandle, Credential, Entry};
use crate::controller::{CREDENTIAL_LABEL, Context, FINALIZER};
use crate::distribution::{Hub, HubSettings};
use crate::leader::Leadership;
use crate::metrics::Metrics;

pub type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Answers the API calls of one reconcile.
pub struct ApiServerVerifier(pub ApiServerHandle);

pub const NS: &str = "payments";
pub const NAME: &str = "stripe";

/// A PartnerIntegration in `payments/stripe` with our finalizer, at `generation`.
pub fn integration(spec: Value, generation: i64) -> PartnerIntegration {
    let spec: PartnerIntegrationSpec = serde_json::from_value(spec).expect("valid spec json");
    let mut pi = PartnerIntegration::new(NAME, spec);
    pi.meta_mut().namespace = Some(NS.into());
    pi.meta_mut().uid = Some("uid-stripe".into());
    pi.meta_mut().generation = Some(generation);
    pi.meta_mut().resource_version = Some("100".into());
    pi.meta_mut().finalizers = Some(vec![FINALIZER.into()]);
    pi
}

pub fn spec(kill: bool) -> Value {
    json!({
        "upstream": {"url": "https://api.stripe.com"},
        "killSwitch": {"enabled": kill, "reason": "INC-123 vendor double-charging"},
        "credentials": {"secretRef": {"name": "stripe-api", "key": "apiKey"}, "format": "Bearer {value}"},
    })
}

/// The Secret `payments/stripe-api`, opted in as a credential.
pub fn secret(value: &str) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some("stripe-api".into());
    s.metadata.namespace = Some(NS.into());
    s.metadata.labels = Some(
        [(CREDENTIAL_LABEL.to_string(), "true".to_string())]
            .into_iter()
            .collect(),
    );
    s.metadata.resource_version = Some("42".into());
    s.data = Some(
        [("apiKey".to_string(), ByteString(value.as_bytes().to_vec()))]
            .into_iter()
            .collect(),
    );
    s
}

/// A catalog entry as an earlier reconcile of `spec` at `generation` left it.
pub fn previous_entry(spec: Value, generation: i64, credential: &str) -> Entry {
    let spec: PartnerIntegrationSpec = serde_json::from_value(spec).expect("valid spec json");
    let policy = tollgate_crds::compile(NS, NAME, &spec).expect("previous spec compiles");
    Entry::new(
        generation,
        spec,
        policy,
        Some(Credential {
            value: tollgate_crds::distribution::SecretValue::new(credential),
            secret_version: "41".into(),
            secret_name: "stripe-api".into(),
            allowed_hosts: None,
            certificate: None,
        }),
    )
}

/// A watch cache holding `objects`, its initial list done.
pub fn cache<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    // The store's readers stay valid after the writer is gone.
    std::mem::forget(writer);
    store
}

/// A context over a mocked API server whose caches hold `secrets` (the labelled Secrets) and
/// `integrations`; `leader` decides whether it may write.
pub fn context_with(
    leader: bool,
    secrets: Vec<Secret>,
    integrations: Vec<PartnerIntegration>,
) -> (Arc<Context>, ApiServerVerifier, CatalogHandle) {
    let (ctx, api, catalog) = bare_context(leader);
    ctx.add_caches(cache(secrets), cache(integrations));
    (ctx, api, catalog)
}

/// [`context_with`] the Secret `stripe-api` = `sk_live_1`.
pub fn context(leader: bool) -> (Arc<Context>, ApiServerVerifier, CatalogHandle) {
    context_with(leader, vec![secret("sk_live_1")], Vec::new())
}

fn bare_context(leader: bool) -> (Arc<Context>, ApiServerVerifier, CatalogHandle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let catalog = CatalogHandle::new();
    let metrics = Arc::new(Metrics::new());
    let hub = Hub::new(catalog.clone(), metrics.clone(), HubSettings::default());
    let ctx = Context::new(
        client,
        catalog.clone(),
        hub,
        Leadership::fixed(leader),
        metrics,
        Reporter {
            controller: "tollgate-operator".into(),
            instance: Some("test".into()),
        },
        Duration::from_secs(10),
    );
    (Arc::new(ctx), ApiServerVerifier(handle), catalog)
}

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Body::from(serde_json::to_vec(&body).expect("json")))
        .expect("response")
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.expect("request body");
    serde_json::from_slice(&bytes).expect("json body")
}

impl ApiServerVerifier {
    async fn next(
        &mut self,
    ) -> (
        Request<Body>,
        tower_test::mock::SendResponse<Response<Body>>,
    ) {
        tokio::time::timeout(Duration::from_secs(1), self.0.next_request())
            .await
            .expect("the reconcile made the expected call in time")
            .expect("service not called")
    }

    /// The status write: server-side apply under our field manager. Returns the status sent.
    pub async fn status_apply(&mut self, pi: &PartnerIntegration) -> PartnerIntegrationStatus {
        let (req, send) = self.next().await;
        assert_eq!(req.method(), Method::PATCH);
        assert_eq!(
            req.uri().path(),
            format!(
                "/apis/tollgate.dev/v1alpha1/namespaces/{NS}/partnerintegrations/{NAME}/status"
            )
        );
        let query = req.uri().query().unwrap_or_default().to_string();
        assert!(query.contains("fieldManager=tollgate-operator"), "{query}");
        assert!(query.contains("force=true"), "{query}");
        assert_eq!(
            req.headers()
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/apply-patch+yaml"[..])
        );
        let body = body_json(req).await;
        assert_eq!(body["apiVersion"], "tollgate.dev/v1alpha1");
        assert_eq!(body["kind"], "PartnerIntegration");
        let status: PartnerIntegrationStatus =
            serde_json::from_value(body["status"].clone()).expect("status shape");
        let mut updated = pi.clone();
        updated.status = Some(status.clone());
        send.send_response(respond(
            StatusCode::OK,
            serde_json::to_value(&updated).expect("json"),
        ));
        status
    }

    /// An event about the integration; returns (type, reason, note).
    pub async fn event_create(&mut self) -> (String, String, String) {
        let (req, send) = self.next().await;
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.uri().path(),
            format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")
        );
        let body = body_json(req).await;
        assert_eq!(body["regarding"]["name"], NAME);
        assert_eq!(body["regarding"]["kind"], "PartnerIntegration");
        let out = (
            body["type"].as_str().unwrap_or_default().to_string(),
            body["reason"].as_str().unwrap_or_default().to_string(),
            body["note"].as_str().unwrap_or_default().to_string(),
        );
        send.send_response(respond(StatusCode::CREATED, body));
        out
    }

    /// The finalizer's JSON patch; returns its operations.
    pub async fn finalizer_patch(&mut self, pi: &PartnerIntegration) -> Value {
        let (req, send) = self.next().await;
        assert_eq!(req.method(), Method::PATCH);
        assert_eq!(
            req.uri().path(),
            format!("/apis/tollgate.dev/v1alpha1/namespaces/{NS}/partnerintegrations/{NAME}")
        );
        assert_eq!(
            req.headers()
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/json-patch+json"[..])
        );
        let ops = body_json(req).await;
        send.send_response(respond(
            StatusCode::OK,
            serde_json::to_value(pi).expect("json"),
        ));
        ops
    }

    /// Nothing else is called.
    pub async fn done(mut self) {
        let extra = tokio::time::timeout(Duration::from_millis(50), self.0.next_request()).await;
        if let Ok(Some((req, _))) = extra {
            panic!("unexpected call {} {}", req.method(), req.uri());
        }
    }
}

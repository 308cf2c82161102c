//! Leader election with a `coordination.k8s.io/v1` Lease.
//!
//! Only the leader writes (status, events, finalizers); every replica reconciles into its own
//! catalog and serves sidecars. As in client-go, expiry is judged on the local clock from the
//! moment this replica last saw the lease record change, never by comparing another replica's
//! clock: a record unchanged for `lease_duration` is free to take. Optimistic concurrency
//! (`resourceVersion` on replace) settles races.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// Read side: whether this replica leads now.
#[derive(Clone)]
pub struct Leadership(watch::Receiver<bool>);

impl Leadership {
    /// Always leader: one replica, `--leader-election=false`, tests.
    pub fn always() -> Self {
        // The receiver keeps its last value after the sender is gone.
        Self::fixed(true)
    }

    /// Fixed either way (tests).
    pub fn fixed(leader: bool) -> Self {
        let (tx, rx) = watch::channel(leader);
        drop(tx);
        Self(rx)
    }

    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }

    /// The next change of leadership: `Some(leading)`, or `None` once it can no longer change.
    pub async fn changed(&mut self) -> Option<bool> {
        self.0.changed().await.ok()?;
        Some(*self.0.borrow_and_update())
    }
}

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// Write side: campaigns and renews until dropped.
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    tx: watch::Sender<bool>,
    /// The last record seen (holder, renew time) and when it was first seen locally.
    observed: Option<(Option<String>, Option<Timestamp>, Instant)>,
    last_renewed: Option<Instant>,
}

impl LeaderElector {
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> (Self, Leadership) {
        let (tx, rx) = watch::channel(false);
        let api = Api::namespaced(client, &cfg.namespace);
        (
            Self {
                api,
                cfg,
                tx,
                observed: None,
                last_renewed: None,
            },
            Leadership(rx),
        )
    }

    /// Campaigns forever.
    pub async fn run(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) {
        loop {
            let leading = match self.try_acquire_or_renew().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, lease = %self.cfg.name, "lease update failed");
                    // Keep leading only while our last renewal is within the lease.
                    self.last_renewed
                        .is_some_and(|t| t.elapsed() < self.cfg.lease_duration)
                        && *self.tx.borrow()
                }
            };
            if leading != *self.tx.borrow() {
                tracing::info!(identity = %self.cfg.identity, leading, "leadership changed");
            }
            metrics.leader.set(i64::from(leading));
            self.tx.send_replace(leading);
            tokio::time::sleep(self.cfg.renew_every).await;
        }
    }

    /// One round: take the lease if free or expired, renew it if ours.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let duration_secs = i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.last_renewed = Some(Instant::now());
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let renew = spec.renew_time.as_ref().map(|t| t.0);
        let record = (holder.clone(), renew);
        match &self.observed {
            Some((h, r, _)) if (h.clone(), *r) == record => {}
            _ => self.observed = Some((record.0, record.1, Instant::now())),
        }
        let ours = holder.as_deref() == Some(self.cfg.identity.as_str());
        let their_duration = spec
            .lease_duration_seconds
            .map_or(self.cfg.lease_duration, |s| {
                Duration::from_secs(u64::try_from(s).unwrap_or(0))
            });
        let expired = self
            .observed
            .as_ref()
            .is_some_and(|(_, _, seen)| seen.elapsed() >= their_duration);
        if !ours && holder.is_some() && !expired {
            return Ok(false);
        }
        let mut next = spec;
        if !ours {
            next.acquire_time = Some(MicroTime(now));
            next.lease_transitions = Some(next.lease_transitions.unwrap_or(0) + 1);
            next.holder_identity = Some(self.cfg.identity.clone());
        }
        next.renew_time = Some(MicroTime(now));
        next.lease_duration_seconds = Some(duration_secs);
        lease.spec = Some(next);
        // `replace` carries the resourceVersion we read: a concurrent writer makes it fail.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.last_renewed = Some(Instant::now());
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn elector() -> (LeaderElector, Handle) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let (e, _) = LeaderElector::new(
            kube::Client::new(svc, "default"),
            LeaseConfig {
                namespace: "tollgate-system".into(),
                name: "tollgate-operator".into(),
                identity: "op-a".into(),
                lease_duration: Duration::from_secs(15),
                renew_every: Duration::from_secs(5),
            },
        );
        (e, handle)
    }

    fn lease(holder: &str, renew: &str) -> Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "tollgate-operator", "namespace": "tollgate-system", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renew, "leaseTransitions": 2}
        })
    }

    fn reply(status: StatusCode, v: Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&v).unwrap()))
            .unwrap()
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": reason})
    }

    /// Answers the GET, then (if `write` is given) the write with it; returns the body written.
    async fn serve(
        h: &mut Handle,
        get: Response<Body>,
        write: Option<(Method, Response<Body>)>,
    ) -> Option<Value> {
        let (req, send) = h.next_request().await.unwrap();
        assert_eq!(req.method(), Method::GET);
        assert_eq!(
            req.uri().path(),
            "/apis/coordination.k8s.io/v1/namespaces/tollgate-system/leases/tollgate-operator"
        );
        send.send_response(get);
        let (method, resp) = write?;
        let (req, send) = h.next_request().await.unwrap();
        assert_eq!(req.method(), method);
        let body: Value =
            serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
        send.send_response(resp);
        Some(body)
    }

    #[tokio::test]
    async fn creates_a_missing_lease_and_leads() {
        let (mut e, mut h) = elector();
        let server = tokio::spawn(async move {
            serve(
                &mut h,
                reply(StatusCode::NOT_FOUND, status(404, "NotFound")),
                Some((
                    Method::POST,
                    reply(
                        StatusCode::CREATED,
                        lease("op-a", "2026-01-01T00:00:00.000000Z"),
                    ),
                )),
            )
            .await
        });
        assert!(e.try_acquire_or_renew().await.unwrap());
        let created = server.await.unwrap().unwrap();
        assert_eq!(created["spec"]["holderIdentity"], "op-a");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_out_a_live_holder_then_takes_over() {
        let (mut e, mut h) = elector();
        let held = "2026-01-01T00:00:00.000000Z";
        let server = tokio::spawn(async move {
            // Held by op-b, seen renewed: follow.
            serve(&mut h, reply(StatusCode::OK, lease("op-b", held)), None).await;
            // Still the same record 10 s later: not expired yet.
            serve(&mut h, reply(StatusCode::OK, lease("op-b", held)), None).await;
            // Unchanged for 15 s: take it over, with the resourceVersion read.
            let taken = serve(
                &mut h,
                reply(StatusCode::OK, lease("op-b", held)),
                Some((Method::PUT, reply(StatusCode::OK, lease("op-a", held)))),
            )
            .await;
            // Renewing our own lease loses a race: conflict means follower this round.
            let _ = serve(
                &mut h,
                reply(StatusCode::OK, lease("op-a", held)),
                Some((
                    Method::PUT,
                    reply(StatusCode::CONFLICT, status(409, "Conflict")),
                )),
            )
            .await;
            taken
        });
        assert!(!e.try_acquire_or_renew().await.unwrap());
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!e.try_acquire_or_renew().await.unwrap());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(e.try_acquire_or_renew().await.unwrap());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!e.try_acquire_or_renew().await.unwrap());
        let taken = server.await.unwrap().unwrap();
        assert_eq!(taken["spec"]["holderIdentity"], "op-a");
        assert_eq!(taken["spec"]["leaseTransitions"], 3);
        assert_eq!(taken["metadata"]["resourceVersion"], "7");
    }
}

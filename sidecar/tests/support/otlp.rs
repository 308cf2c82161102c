//! A test OTLP/HTTP receiver: decodes `ExportTraceServiceRequest` with the official protobuf
//! definitions (opentelemetry-proto) and keeps every span, plus the raw bytes received (to
//! search for anything that must never be exported).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use tokio::net::TcpListener;
use tollgate_testkit::wait::eventually_async;

#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
    /// Each event's name and attributes.
    pub events: Vec<(String, BTreeMap<String, String>)>,
    pub service_name: String,
}

pub struct Receiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<SpanRecord>>>,
    raw: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// A receiver on `listener` (one bound in a test network namespace, say).
    pub fn start_on(listener: TcpListener) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<SpanRecord>>> = Arc::default();
        let raw: Arc<Mutex<Vec<u8>>> = Arc::default();
        let (s, r) = (spans.clone(), raw.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, r) = (s.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, r) = (s.clone(), r.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            if path == "/v1/traces" {
                                r.lock().unwrap().extend_from_slice(&body);
                                if let Ok(export) = ExportTraceServiceRequest::decode(body) {
                                    let mut out = s.lock().unwrap();
                                    for rs in export.resource_spans {
                                        let service_name = rs
                                            .resource
                                            .as_ref()
                                            .and_then(|res| {
                                                res.attributes
                                                    .iter()
                                                    .find(|a| a.key == "service.name")
                                            })
                                            .map(|a| text(&a.value))
                                            .unwrap_or_default();
                                        for ss in rs.scope_spans {
                                            for span in ss.spans {
                                                out.push(SpanRecord {
                                                    name: span.name.clone(),
                                                    trace_id: hex(&span.trace_id),
                                                    span_id: hex(&span.span_id),
                                                    parent_span_id: hex(&span.parent_span_id),
                                                    attributes: span
                                                        .attributes
                                                        .iter()
                                                        .map(|a| (a.key.clone(), text(&a.value)))
                                                        .collect(),
                                                    events: span
                                                        .events
                                                        .iter()
                                                        .map(|e| {
                                                            (
                                                                e.name.clone(),
                                                                e.attributes
                                                                    .iter()
                                                                    .map(|a| {
                                                                        (
                                                                            a.key.clone(),
                                                                            text(&a.value),
                                                                        )
                                                                    })
                                                                    .collect(),
                                                            )
                                                        })
                                                        .collect(),
                                                    service_name: service_name.clone(),
                                                });
                                            }
                                        }
                                    }
                                }
                            }
                            let ok = ExportTraceServiceResponse::default().encode_to_vec();
                            let mut resp = Response::new(Full::new(Bytes::from(ok)));
                            resp.headers_mut()
                                .insert("content-type", "application/x-protobuf".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            spans,
            raw,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<SpanRecord> {
        self.spans.lock().unwrap().clone()
    }

    pub fn raw(&self) -> Vec<u8> {
        self.raw.lock().unwrap().clone()
    }

    /// Waits until `n` spans named `name` arrived (the exporter batches).
    pub async fn wait_for(&self, name: &str, n: usize) -> Vec<SpanRecord> {
        let what = format!("{n} {name} spans");
        eventually_async(&what, std::time::Duration::from_secs(15), async || {
            let got: Vec<SpanRecord> = self
                .spans()
                .into_iter()
                .filter(|s| s.name == name)
                .collect();
            anyhow::ensure!(
                got.len() >= n,
                "only {} {name} spans arrived: {:?}",
                got.len(),
                self.spans()
            );
            Ok(got)
        })
        .await
    }
}

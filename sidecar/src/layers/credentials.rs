//! Credentials: the integration's secret, rendered into its header, set over whatever the app
//! sent. The app never holds the key.

use std::task::{Context, Poll};

use http::Request;
use tower::{Layer, Service};

use super::Call;
use crate::body::ReqBody;

pub fn layer() -> CredentialsLayer {
    CredentialsLayer
}

#[derive(Clone, Copy, Debug)]
pub struct CredentialsLayer;

impl<S> Layer<S> for CredentialsLayer {
    type Service = Credentials<S>;
    fn layer(&self, inner: S) -> Credentials<S> {
        Credentials { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Credentials<S> {
    inner: S,
}

impl<S> Service<Request<ReqBody>> for Credentials<S>
where
    S: Service<Request<ReqBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let call = Call::from_request(&req);
        let integration = &call.integration;
        if let Some(policy) = &integration.policy.credentials {
            // Whatever the app sent under this header never reaches the partner.
            req.headers_mut().remove(&policy.header);
            if let Some(value) = &integration.credential {
                req.headers_mut()
                    .insert(policy.header.clone(), value.clone());
            }
        }
        self.inner.call(req)
    }
}

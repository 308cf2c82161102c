//! Credentials: the integration's secret, rendered into its header, set over whatever the app
//! sent. The app never holds the key.

use http::Request;

use super::gate::{Admit, Gate, GateLayer};
use super::{Call, CallError};
use crate::body::ReqBody;

pub(crate) fn layer() -> GateLayer<Credentials> {
    GateLayer::new(Credentials)
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Credentials;

impl Gate for Credentials {
    fn check(&self, req: &mut Request<ReqBody>, call: &Call) -> Result<Admit, CallError> {
        let integration = &call.integration;
        if let Some(policy) = &integration.policy.credentials {
            // Whatever the app sent under this header never reaches the partner.
            req.headers_mut().remove(&policy.header);
            if let Some(value) = &integration.credential {
                req.headers_mut()
                    .insert(policy.header.clone(), value.clone());
            }
        }
        Ok(Admit::Now)
    }
}

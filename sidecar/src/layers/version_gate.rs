//! Version gate: denied (deprecated) path prefixes answer 410 and never reach the partner;
//! pinned version headers are set on every request, over whatever the app sent.

use http::Request;

use super::gate::{Admit, Gate, GateLayer};
use super::{Call, CallError};
use crate::answer::Reason;
use crate::body::ReqBody;

pub(crate) fn layer() -> GateLayer<VersionGate> {
    GateLayer::new(VersionGate)
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct VersionGate;

impl Gate for VersionGate {
    fn check(&self, req: &mut Request<ReqBody>, call: &Call) -> Result<Admit, CallError> {
        let versioning = &call.integration.policy.versioning;
        if let Some(prefix) = versioning.denied(req.uri().path()) {
            let msg =
                format!("path prefix {prefix} is denied (spec.versioning.deniedPathPrefixes)");
            return Err(call.answer(Reason::DeprecatedVersion, msg).into());
        }
        for (name, value) in &versioning.pin_headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        Ok(Admit::Now)
    }
}

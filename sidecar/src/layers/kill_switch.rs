//! Kill switch: while on (for the integration or the route), nothing reaches the partner.

use http::Request;
use tollgate_crds::policy::KillSwitchPolicy;

use super::gate::{Admit, Gate, GateLayer};
use super::{Call, CallError};
use crate::answer::Reason;
use crate::body::ReqBody;

pub(crate) fn layer() -> GateLayer<KillSwitch> {
    GateLayer::new(KillSwitch)
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct KillSwitch;

/// What the app is told while `ks` is on; `None`: it is off. Tunnels say the same.
pub(crate) fn refusal(ks: &KillSwitchPolicy) -> Option<String> {
    if !ks.enabled {
        return None;
    }
    Some(match ks.reason.as_deref().filter(|r| !r.is_empty()) {
        Some(r) => format!("kill switch is on: {r}"),
        None => "kill switch is on".to_string(),
    })
}

impl Gate for KillSwitch {
    fn check(&self, _req: &mut Request<ReqBody>, call: &Call) -> Result<Admit, CallError> {
        match refusal(&call.route_policy().kill_switch) {
            Some(message) => Err(call.answer(Reason::KillSwitch, message).into()),
            None => Ok(Admit::Now),
        }
    }
}

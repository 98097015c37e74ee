//! Lifecycle: whether an agent in a given state takes requests.

use crate::error::EdgeError;
use crate::registry::AgentState;

/// Admits a request to an agent in `state`, or refuses it with the spec's status for that state.
pub fn admit(state: AgentState) -> Result<(), EdgeError> {
    match state {
        AgentState::Running => Ok(()),
        AgentState::Paused => Err(EdgeError::AgentPaused),
        AgentState::Initializing => Err(EdgeError::AgentInitializing),
        AgentState::Terminated => Err(EdgeError::AgentTerminated),
    }
}

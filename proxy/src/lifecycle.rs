//! Lifecycle: an agent's states, and whether an agent in a given state takes requests.

use std::fmt;
use std::str::FromStr;

use crate::error::EdgeError;

/// An agent's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentState {
    /// Starting: requests get 202 and `retry-after: 60`.
    Initializing,
    /// Serving.
    Running,
    /// Paused: requests get 503.
    Paused,
    /// Gone for good: requests get 410.
    Terminated,
}

impl AgentState {
    /// The state's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initializing => "initializing",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Terminated => "terminated",
        }
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AgentState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "initializing" => Ok(Self::Initializing),
            "running" => Ok(Self::Running),
            "paused" => Ok(Self::Paused),
            "terminated" => Ok(Self::Terminated),
            _ => Err(format!(
                "expected initializing, running, paused or terminated, got {s:?}"
            )),
        }
    }
}

/// Admits a request to an agent in `state`, or refuses it with the spec's status for that state.
pub fn gate(state: AgentState) -> Result<(), EdgeError> {
    match state {
        AgentState::Running => Ok(()),
        AgentState::Paused => Err(EdgeError::AgentPaused),
        AgentState::Initializing => Err(EdgeError::AgentInitializing),
        AgentState::Terminated => Err(EdgeError::AgentTerminated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_gate_requests() {
        for s in [
            AgentState::Initializing,
            AgentState::Running,
            AgentState::Paused,
            AgentState::Terminated,
        ] {
            assert_eq!(s.as_str().parse::<AgentState>(), Ok(s));
        }
        assert!("sleeping".parse::<AgentState>().is_err());
        assert_eq!(gate(AgentState::Running), Ok(()));
        assert_eq!(gate(AgentState::Paused), Err(EdgeError::AgentPaused));
        assert_eq!(
            gate(AgentState::Initializing),
            Err(EdgeError::AgentInitializing)
        );
        assert_eq!(
            gate(AgentState::Terminated),
            Err(EdgeError::AgentTerminated)
        );
    }
}

//! The MoltGhost load harness and the reference agent runtime.
//!
//! The reference runtime ([`runtime`]) is the one OpenAI-compatible agent that the edge's tests,
//! `moltghost dev` and the benchmarks all talk to: deterministic answers, configurable timing,
//! exact usage, and faults (stall, abort, error status) on request. The harness ([`harness`])
//! measures any OpenAI-compatible endpoint the way users feel it.

pub mod harness;
pub mod runtime;

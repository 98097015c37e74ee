//! The load harness: open-loop arrivals timed from the intended send (the wrk2 way, so a slow
//! server cannot hide its latency by slowing the client down), HdrHistogram percentiles, stream
//! timings, and every target interleaved round by round in one run so that comparisons are
//! same-run ratios, not numbers from different moments of a shared machine.

pub mod measure;
pub mod pacer;
pub mod plot;
pub mod procfs;
pub mod report;
pub mod run;
pub mod target;
pub mod websocket;

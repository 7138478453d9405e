//! What Ultra's tests (`tests/it`) and benchmarks (`ultra-bench`) need and the product
//! does not: cleaning up after a run, faults an operator would cause by hand, rows the
//! api would never write on its own, and the audit of the delivery guarantees. It is
//! kept out of `common` so the release binary carries none of it.

pub mod audit;
pub mod jobs;
pub mod queue;

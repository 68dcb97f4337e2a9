//! meshtun load generator (library half; the binary is `meshtun-loadgen`).
//! See docs/SCALING.md for what it measures and how to run it.

pub mod pow;
pub mod identities;
pub mod hist;
pub mod net;
pub mod procstat;
pub mod run;

//! Index tests on real data and across process crashes (one test binary for the area).

mod durability;
mod glove;

//! Prints the time per `decide()` with 10 000 rules and its ratio to the 5 µs budget.
//!
//! `cargo run --release -p shuttle-policy --example decide_budget`

use std::time::{Duration, Instant};

#[path = "../benches/support/mod.rs"]
mod support;

fn main() {
    let rules = 10_000;
    let start = Instant::now();
    let policy = support::policy(rules);
    let parse = start.elapsed();
    let objects = support::objects(rules);
    // Warm up, then measure.
    support::measure(&policy, &objects, Duration::from_millis(200));
    let ns = support::measure(&policy, &objects, Duration::from_secs(1));
    println!("parse {rules} rules: {} ms", parse.as_millis());
    println!("{}", support::report(rules, ns));
}

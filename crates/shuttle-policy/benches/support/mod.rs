//! A synthetic 10 000-rule policy and request mix shared by the bench and the budget example.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use shuttle_policy::{Decision, Op, Policy, Request, VmIdentity};

/// The decision-time budget from the design brief.
pub const BUDGET_NS: f64 = 5000.0;

/// A policy of `n` rules: 60 % literal unix paths, 15 % literal TCP ports, 25 % glob paths,
/// spread over 50 client VMs and 20 server VMs, ending with a catch-all deny.
pub fn policy_text(n: usize) -> String {
    let mut text = String::new();
    for i in 0..n.saturating_sub(1) {
        let from = format!("web-{}", i % 50);
        let to = format!("db-{}", i % 20);
        let object = match i % 20 {
            0..=11 => format!("unix:/run/app{i}/server.sock"),
            12..=14 => format!("tcp:{}", 1 + i % 65000),
            _ => format!("unix:/run/svc{i}/*.sock"),
        };
        let action = if i % 7 == 0 { "deny" } else { "allow" };
        let _ = write!(
            text,
            "[[rule]]\nop = \"connect\"\nfrom = [\"{from}\", \"@tag:t{}\"]\nto = \"{to}\"\n\
             object = \"{object}\"\naction = \"{action}\"\n\n",
            i % 13
        );
    }
    text.push_str(
        "[[rule]]\nop = \"connect\"\nfrom = \"@any\"\nto = \"@host\"\nobject = \"unix:/*\"\n\
         action = \"deny\"\n",
    );
    text
}

/// A compiled policy of `n` rules.
pub fn policy(n: usize) -> Policy {
    Policy::parse("bench.toml", &policy_text(n)).expect("the bench policy is valid")
}

/// Request objects: literal hits, glob hits, misses that fall through to the last rule.
pub fn objects(n: usize) -> Vec<String> {
    let mut v = Vec::new();
    for k in 0..256usize {
        let i = (k * 7919) % n.saturating_sub(1).max(1);
        v.push(match k % 4 {
            0 => format!("unix:/run/app{i}/server.sock"),
            1 => format!("tcp:{}", 1 + i % 65000),
            2 => format!("unix:/run/svc{i}/x.sock"),
            _ => format!("unix:/nowhere/{i}"),
        });
    }
    v
}

/// Runs `decide` over the request mix for about `for_at_least`; returns ns per decision.
pub fn measure(policy: &Policy, objects: &[String], for_at_least: Duration) -> f64 {
    let tags = vec!["t3".to_string()];
    let froms = [
        VmIdentity::vm("web-7", &[]),
        VmIdentity::vm("web-12", &tags),
        VmIdentity::Host,
    ];
    let mut count = 0u64;
    let mut sink = 0usize;
    let start = Instant::now();
    while start.elapsed() < for_at_least {
        for (k, o) in objects.iter().enumerate() {
            let req = Request::new(Op::Connect, froms[k % froms.len()], o);
            let d: Decision<'_> = policy.decide(std::hint::black_box(&req));
            sink += d.rule.map_or(0, |r| r.number());
        }
        count += objects.len() as u64;
    }
    std::hint::black_box(sink);
    start.elapsed().as_nanos() as f64 / count as f64
}

/// The line the brief asks for.
pub fn report(n: usize, ns: f64) -> String {
    format!(
        "decide with {n} rules: {ns:.0} ns/decision (budget {BUDGET_NS:.0} ns, ratio {:.3})",
        ns / BUDGET_NS
    )
}

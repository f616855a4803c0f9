//! `decide()` against a 10 000-rule policy; prints the time per decision against the 5 µs
//! budget.

#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use shuttle_policy::{Op, Request, VmIdentity};

mod support;

const RULES: usize = 10_000;

fn bench_decide(c: &mut Criterion) {
    let policy = support::policy(RULES);
    let objects = support::objects(RULES);
    let web = VmIdentity::vm("web-7", &[]);
    let mut k = 0usize;
    c.bench_function("decide/10000 rules", |b| {
        b.iter(|| {
            k = (k + 1) % objects.len();
            let req = Request::new(Op::Connect, web, &objects[k]);
            policy.decide(std::hint::black_box(&req)).action
        })
    });
    let ns = support::measure(&policy, &objects, Duration::from_secs(1));
    println!("{}", support::report(RULES, ns));
}

fn bench_parse(c: &mut Criterion) {
    let text = support::policy_text(RULES);
    let mut group = c.benchmark_group("parse");
    group.sample_size(10);
    group.bench_function("10000 rules", |b| {
        b.iter(|| shuttle_policy::Policy::parse("bench.toml", &text).map(|p| p.len()))
    });
    group.finish();
}

criterion_group!(benches, bench_decide, bench_parse);
criterion_main!(benches);

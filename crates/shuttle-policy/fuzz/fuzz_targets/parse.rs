//! Parsing arbitrary text must never panic, and a policy that parses must decide and explain
//! without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shuttle_policy::{Op, Policy, Request, VmIdentity};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse("fuzz.toml", text) {
        Ok(policy) => {
            let tags = vec!["x".to_string()];
            let from = VmIdentity::vm("web", &tags);
            for op in Op::ALL {
                for rule in policy.rules() {
                    let req = Request::new(op, from, rule.object().as_str());
                    let decision = policy.decide(&req);
                    assert_eq!(decision, policy.decide_linear(&req));
                    let _ = policy.explain(&req.to(VmIdentity::Host)).to_string();
                }
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            let _ = errors.to_string();
        }
    }
});

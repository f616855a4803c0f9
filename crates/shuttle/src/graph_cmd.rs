//! `shuttle graph FILE`: a system as a picture. VMs are boxes (Graphviz clusters) with their
//! applications inside; dependencies are edges between applications; the policy's rules that
//! allow something between the system's VMs are edges between the VMs, labelled with the
//! audit's counts; components (a directory of one VM read-only in another) are edges from
//! the VM that uses them to the one that provides them, counted by the audit's `share`
//! records; requests the audit saw that no allowing rule explains are red dashed edges.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use shuttle_audit::{AuditStore, EdgeCount, Filter};
use shuttle_policy::{Action, Policy, VmIdentity};
use shuttle_proto::BrokerRequest;
use shuttle_system::Manifest;
use shuttle_vm::Layout;

use crate::cli::GraphArgs;

/// Where refused requests that name no target VM go in the picture.
const UNROUTED: &str = "(refused)";

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Graph {
    pub system: String,
    pub vms: Vec<GraphVm>,
    pub edges: Vec<GraphEdge>,
    /// While the system is up: each application's state (`ready`, `failed`, ...) and restarts.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub states: BTreeMap<String, (String, u32)>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct GraphVm {
    pub name: String,
    /// Whether the manifest declares it (others only appear in the policy or the audit).
    pub declared: bool,
    pub apps: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct GraphEdge {
    /// `requires` (application to application), `rule` (an allowing rule, VM to VM),
    /// `component` (a component dependency, consumer VM to provider VM) or `denied`
    /// (refused requests no allowing rule explains).
    pub kind: &'static str,
    pub from: String,
    pub to: String,
    pub label: String,
    pub allowed: u64,
    pub denied: u64,
}

/// Builds the graph from a manifest, its policy and the audit's per-edge counts.
pub fn build(manifest: &Manifest, policy: Option<&Policy>, counts: &[EdgeCount]) -> Graph {
    let mut vms: Vec<GraphVm> = manifest
        .vms
        .iter()
        .map(|v| GraphVm {
            name: v.name.clone(),
            declared: true,
            apps: manifest
                .apps
                .iter()
                .filter(|a| a.vm == v.name)
                .map(|a| a.id())
                .collect(),
        })
        .collect();
    let mut edges = Vec::new();
    for a in &manifest.apps {
        for r in &a.requires {
            edges.push(GraphEdge {
                kind: "requires",
                from: a.id(),
                to: r.clone(),
                label: "requires".into(),
                allowed: 0,
                denied: 0,
            });
        }
    }
    // Which audit rows a rule or component edge accounts for.
    let mut explained = vec![false; counts.len()];
    for v in &manifest.vms {
        for c in &v.components {
            let (mut allowed, mut denied) = (0, 0);
            for (i, e) in counts.iter().enumerate() {
                if e.op == "share" && e.from == v.name && e.to.as_deref() == Some(c.vm.as_str()) {
                    allowed += e.allowed;
                    denied += e.denied;
                    explained[i] = true;
                }
            }
            let after = c
                .app
                .as_ref()
                .map(|a| format!(", after {a}"))
                .unwrap_or_default();
            let at = if c.at == c.path {
                String::new()
            } else {
                format!(" at {}", c.at)
            };
            edges.push(GraphEdge {
                kind: "component",
                from: v.name.clone(),
                to: c.vm.clone(),
                label: format!(
                    "component {}{at} (read-only{after})\nallowed {allowed}, denied {denied}",
                    c.path
                ),
                allowed,
                denied,
            });
        }
    }
    if let Some(policy) = policy {
        for rule in policy.rules() {
            if !matches!(rule.action(), Action::Allow | Action::Ask) {
                continue;
            }
            for from in &manifest.vms {
                let id = VmIdentity::vm(&from.name, &from.tags);
                if !rule.from().matches(&id) {
                    continue;
                }
                let targets: Vec<&str> = match rule.target().and_then(|t| t.vm_name()) {
                    Some(t) => vec![t],
                    None => manifest
                        .vms
                        .iter()
                        .filter(|v| rule.to().matches(&VmIdentity::vm(&v.name, &v.tags)))
                        .map(|v| v.name.as_str())
                        .collect(),
                };
                for to in targets {
                    if to == from.name {
                        continue;
                    }
                    let (mut allowed, mut denied) = (0, 0);
                    for (i, c) in counts.iter().enumerate() {
                        if c.op == rule.op().as_str()
                            && c.from == from.name
                            && c.to.as_deref() == Some(to)
                        {
                            allowed += c.allowed;
                            denied += c.denied;
                            explained[i] = true;
                        }
                    }
                    let name = rule.name().map(|n| format!(" ({n})")).unwrap_or_default();
                    edges.push(GraphEdge {
                        kind: "rule",
                        from: from.name.clone(),
                        to: to.to_owned(),
                        label: format!(
                            "{} {}{name}\nallowed {allowed}, denied {denied}",
                            rule.op(),
                            rule.object()
                        ),
                        allowed,
                        denied,
                    });
                }
            }
        }
    }
    for (i, c) in counts.iter().enumerate() {
        if explained[i] || c.from == "@host" {
            continue;
        }
        let to = c.to.clone().unwrap_or_else(|| UNROUTED.into());
        edges.push(GraphEdge {
            kind: "denied",
            from: c.from.clone(),
            to,
            label: format!("{}\nallowed {}, denied {}", c.op, c.allowed, c.denied),
            allowed: c.allowed,
            denied: c.denied,
        });
    }
    // VMs that only the policy edges or the audit name.
    let mut extra: Vec<String> = Vec::new();
    for e in edges.iter().filter(|e| e.kind != "requires") {
        for n in [&e.from, &e.to] {
            if !vms.iter().any(|v| &v.name == n) && !extra.contains(n) {
                extra.push(n.clone());
            }
        }
    }
    vms.extend(extra.into_iter().map(|name| GraphVm {
        name,
        declared: false,
        apps: Vec::new(),
    }));
    Graph {
        system: manifest.name.clone(),
        vms,
        edges,
        states: BTreeMap::new(),
    }
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The graph in Graphviz's language. Each VM is a cluster with an invisible anchor node that
/// VM-to-VM edges start and end at (clipped to the cluster's box with `ltail`/`lhead`).
pub fn to_dot(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "digraph {} {{", quote(&g.system));
    let _ = writeln!(
        s,
        "  compound=true; rankdir=LR; fontname=\"Helvetica\"; label={}; labelloc=t;",
        quote(&format!("system {}", g.system))
    );
    let _ = writeln!(
        s,
        "  node [fontname=\"Helvetica\"]; edge [fontname=\"Helvetica\", fontsize=10];"
    );
    for vm in &g.vms {
        if vm.name == UNROUTED {
            let _ = writeln!(
                s,
                "  {} [label=\"refused: stays in the caller's VM\", shape=plaintext, fontcolor=\"#cf222e\"];",
                quote(&format!("vm:{UNROUTED}"))
            );
            continue;
        }
        let _ = writeln!(
            s,
            "  subgraph {} {{",
            quote(&format!("cluster_{}", vm.name))
        );
        let style = if vm.declared {
            "rounded"
        } else {
            "rounded,dashed"
        };
        let _ = writeln!(
            s,
            "    label={}; style={}; color=\"#555555\";",
            quote(&format!("VM {}", vm.name)),
            quote(style)
        );
        let _ = writeln!(
            s,
            "    {} [shape=point, style=invis, width=0.01];",
            quote(&format!("vm:{}", vm.name))
        );
        for a in &vm.apps {
            let short = a.split_once('.').map_or(a.as_str(), |(_, n)| n);
            let (label, fill) = match g.states.get(a) {
                None => (short.to_owned(), "#eef3ff"),
                Some((state, restarts)) => {
                    let fill = match state.as_str() {
                        "ready" => "#dafbe1",
                        "failed" | "exited" => "#ffebe9",
                        _ => "#fff8c5",
                    };
                    let restarts = match restarts {
                        0 => String::new(),
                        1 => ", 1 restart".into(),
                        n => format!(", {n} restarts"),
                    };
                    (format!("{short}\n{state}{restarts}"), fill)
                }
            };
            let _ = writeln!(
                s,
                "    {} [label={}, shape=box, style=\"rounded,filled\", fillcolor=\"{fill}\"];",
                quote(a),
                quote(&label)
            );
        }
        let _ = writeln!(s, "  }}");
    }
    for e in &g.edges {
        match e.kind {
            "requires" => {
                let _ = writeln!(
                    s,
                    "  {} -> {} [label=\"requires\", style=bold];",
                    quote(&e.from),
                    quote(&e.to)
                );
            }
            kind => {
                let (color, style) = match kind {
                    "rule" => ("#1a7f37", "solid"),
                    "component" => ("#0969da", "bold"),
                    _ => ("#cf222e", "dashed"),
                };
                let lhead = if e.to == UNROUTED {
                    String::new()
                } else {
                    format!(", lhead={}", quote(&format!("cluster_{}", e.to)))
                };
                let _ = writeln!(
                    s,
                    "  {} -> {} [ltail={}{lhead}, label={}, color=\"{color}\", fontcolor=\"{color}\", style={style}];",
                    quote(&format!("vm:{}", e.from)),
                    quote(&format!("vm:{}", e.to)),
                    quote(&format!("cluster_{}", e.from)),
                    quote(&e.label)
                );
            }
        }
    }
    s.push_str("}\n");
    s
}

fn audit_counts(layout: &Layout) -> Result<Vec<EdgeCount>> {
    if let Ok(chan) = shuttle_broker::client::connect(layout, "collect audit records") {
        let _ = shuttle_broker::client::request(&chan, &BrokerRequest::CollectAudit);
    }
    let db = layout.audit_db();
    if !db.exists() {
        return Ok(Vec::new());
    }
    let store = AuditStore::open_read_only(&db)
        .with_context(|| format!("opening the audit store {}", db.display()))?;
    Ok(store.counts_by_edge(&Filter::default())?)
}

/// `shuttle graph FILE [--format dot|svg] [--json]`.
pub fn graph(layout: &Layout, args: &GraphArgs) -> Result<i32> {
    let file = match &args.file {
        Some(f) => f.clone(),
        None => match crate::system_cmd::running_manifests(layout).as_slice() {
            [one] => one.clone(),
            [] => bail!("no system is up: name its manifest, as in `shuttle graph FILE`"),
            _ => bail!("several systems are up: name one's manifest, as in `shuttle graph FILE`"),
        },
    };
    let manifest = Manifest::load(&file).map_err(|e| anyhow!("{e}"))?;
    // The system's own policy; without one, the active policy.
    let policy = match &manifest.policy {
        Some(p) => Some(
            Policy::parse(&p.path.display().to_string(), &p.text).map_err(|e| anyhow!("{e}"))?,
        ),
        None => Some(shuttle_vm::vm_api::build_active_policy(layout).map_err(|e| anyhow!("{e}"))?),
    };
    let counts = audit_counts(layout)?;
    let mut g = build(&manifest, policy.as_ref(), &counts);
    if let Some(state) = crate::system_cmd::running_state(layout, &manifest.name) {
        g.states = state
            .apps
            .into_iter()
            .map(|a| (a.id, (a.state, a.restarts)))
            .collect();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&g)?);
        return Ok(0);
    }
    let dot = to_dot(&g);
    if args.format == "dot" {
        print!("{dot}");
        return Ok(0);
    }
    let mut child = match Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "--format svg needs Graphviz's `dot` (apt-get install graphviz); \
             --format dot prints the source instead"
        ),
        Err(e) => return Err(e).context("running dot"),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(dot.as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("dot -Tsvg failed ({status})");
    }
    Ok(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rules_dependencies_and_denials_become_edges() {
        let m = Manifest::parse(
            "s.toml",
            "[vm.db]\ntags=[\"data\"]\n[vm.db.app.pg]\ncommand=[\"pg\"]\n[vm.shop.app.web]\ncommand=[\"w\"]\nrequires=[\"db.pg\"]\n",
        )
        .unwrap();
        let p = Policy::parse(
            "p.toml",
            "[[rule]]\nname=\"cat\"\nop=\"connect\"\nfrom=\"shop\"\nto=\"@tag:data\"\nobject=\"unix:/run/db.sock\"\naction=\"allow\"\n",
        );
        // `to` must name one VM for connect; use the name instead if tags are refused.
        let p = p.or_else(|_| {
            Policy::parse(
                "p.toml",
                "[[rule]]\nname=\"cat\"\nop=\"connect\"\nfrom=\"shop\"\nto=\"db\"\nobject=\"unix:/run/db.sock\"\naction=\"allow\"\n",
            )
        })
        .unwrap();
        let counts = vec![
            EdgeCount {
                op: "connect".into(),
                from: "shop".into(),
                to: Some("db".into()),
                allowed: 3,
                denied: 0,
            },
            EdgeCount {
                op: "connect".into(),
                from: "intruder".into(),
                to: None,
                allowed: 0,
                denied: 2,
            },
        ];
        let g = build(&m, Some(&p), &counts);
        assert_eq!(
            g.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            ["db", "shop", "intruder", UNROUTED]
        );
        assert_eq!(g.edges.len(), 3, "{:#?}", g.edges);
        assert_eq!(
            (
                g.edges[0].kind,
                g.edges[0].from.as_str(),
                g.edges[0].to.as_str()
            ),
            ("requires", "shop.web", "db.pg")
        );
        assert_eq!(
            (g.edges[1].kind, g.edges[1].allowed, g.edges[1].denied),
            ("rule", 3, 0)
        );
        assert!(g.edges[1].label.contains("connect unix:/run/db.sock (cat)"));
        assert_eq!(
            (g.edges[2].kind, g.edges[2].from.as_str(), g.edges[2].denied),
            ("denied", "intruder", 2)
        );
        let dot = to_dot(&g);
        assert!(dot.contains("subgraph \"cluster_db\""), "{dot}");
        assert!(
            dot.contains("\"shop.web\" -> \"db.pg\" [label=\"requires\""),
            "{dot}"
        );
        assert!(dot.contains("\"vm:shop\" -> \"vm:db\" [ltail=\"cluster_shop\", lhead=\"cluster_db\", label=\"connect unix:/run/db.sock (cat)\\nallowed 3, denied 0\""), "{dot}");
    }

    #[test]
    fn components_are_edges_that_explain_the_audits_share_records() {
        let m = Manifest::parse(
            "s.toml",
            "[vm.db.app.pg]\ncommand=[\"pg\"]\n[vm.web]\ncomponents=[{from=\"db.pg\", path=\"/usr/share/pg\", at=\"/opt/pg\"}]\n[vm.web.app.w]\ncommand=[\"w\"]\n",
        )
        .unwrap();
        let counts = vec![EdgeCount {
            op: "share".into(),
            from: "web".into(),
            to: Some("db".into()),
            allowed: 1,
            denied: 0,
        }];
        let g = build(&m, None, &counts);
        assert_eq!(g.edges.len(), 1, "{:#?}", g.edges);
        let e = &g.edges[0];
        assert_eq!(
            (e.kind, e.from.as_str(), e.to.as_str(), e.allowed),
            ("component", "web", "db", 1)
        );
        assert_eq!(
            e.label,
            "component /usr/share/pg at /opt/pg (read-only, after db.pg)\nallowed 1, denied 0"
        );
        assert!(to_dot(&g).contains("color=\"#0969da\""));
    }
}

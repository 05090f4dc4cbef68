//! Istio PeerAuthentication: the one model of the modes and of Istio's precedence rules, shared
//! by Kubernetes mode (the modes the report shows), `mtls-agent policy` (which resources the
//! traffic proves safe) and `report --assume-policy` (what a proposed policy would reject).
//!
//! - [`Rule`] is one PeerAuthentication reduced to what decides a mode; [`effective`] applies
//!   Istio's precedence to a set of them.
//! - [`file`] reads PeerAuthentication YAML strictly (unknown fields are errors) and writes it.
//! - [`generate`] turns a report into the resources that are safe now.
//! - [`whatif`] judges a report's blockers under a set of rules.
pub mod file;
pub mod generate;
pub mod whatif;

use serde::{Deserialize, Serialize};

/// Default Istio root namespace (`--istio-root-namespace`): mesh-wide policies live there.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// A PeerAuthentication mTLS mode, spelled as Istio spells it (`STRICT`, `PERMISSIVE`,
/// `DISABLE`, `UNSET`); deserialising accepts any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    /// Inherit from the parent level (port → workload → namespace → mesh → PERMISSIVE).
    Unset,
    /// Plaintext only (the sidecar does not terminate mTLS).
    Disable,
    /// mTLS and plaintext accepted: Istio's default.
    Permissive,
    /// Only Istio mTLS accepted.
    Strict,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Unset => "UNSET",
            Mode::Disable => "DISABLE",
            Mode::Permissive => "PERMISSIVE",
            Mode::Strict => "STRICT",
        }
    }

    /// Parses any case; `None` for an unknown spelling.
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s.to_ascii_uppercase().as_str() {
            "UNSET" | "" => Mode::Unset,
            "DISABLE" => Mode::Disable,
            "PERMISSIVE" => Mode::Permissive,
            "STRICT" => Mode::Strict,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Mode::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown mTLS mode {s:?} (expected STRICT, PERMISSIVE, DISABLE or UNSET)"
            ))
        })
    }
}

/// Which PeerAuthentication decided an effective mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeSource {
    /// `portLevelMtls` of a workload-selector policy.
    WorkloadPort,
    /// `mtls.mode` of a workload-selector policy.
    Workload,
    /// A policy without selector in the workload's namespace.
    Namespace,
    /// A policy without selector in the root namespace.
    Mesh,
    /// No policy set a mode: Istio's default, PERMISSIVE.
    Default,
}

/// The effective mode and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectiveMode {
    pub mode: Mode,
    pub source: ModeSource,
    /// `namespace/name` of the deciding PeerAuthentication (none for the default).
    pub policy: Option<String>,
}

/// One PeerAuthentication, reduced to what decides a mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub namespace: String,
    pub name: String,
    /// `matchLabels` of the workload selector; `None` (or empty matchLabels): the whole
    /// namespace (or the mesh, in the root namespace).
    #[serde(default)]
    pub selector: Option<Vec<(String, String)>>,
    pub mode: Mode,
    /// `portLevelMtls`: container port → mode. Honoured only with a selector, as Istio does.
    #[serde(default)]
    pub ports: Vec<(u32, Mode)>,
    /// Creation time (Unix seconds): among several matching policies of one level the oldest
    /// wins, as in Istio. Policies not applied yet (`--assume-policy`) are the newest.
    #[serde(default)]
    pub created: i64,
}

impl Rule {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The effective mode for a pod with `labels` in `namespace` on `port` (`None`: the workload
/// level), following Istio: the oldest matching workload-selector policy (its `portLevelMtls`
/// for the port, then its `mtls.mode`), then the oldest namespace-wide policy, then the oldest
/// policy without selector in the root namespace; each level decides only with a mode other than
/// UNSET (UNSET inherits); PERMISSIVE when none does. `rules_in(ns)` lists a namespace's rules.
pub fn effective<'a, I>(
    root_namespace: &str,
    namespace: &str,
    rules_in: impl Fn(&str) -> I,
    labels: impl Fn(&str, &str) -> bool,
    port: Option<u16>,
) -> EffectiveMode
where
    I: IntoIterator<Item = &'a Rule>,
{
    let oldest = |ns: &str, with_selector: bool| -> Option<&'a Rule> {
        rules_in(ns)
            .into_iter()
            .filter(|p| {
                p.selector.is_some() == with_selector
                    && p.selector
                        .as_ref()
                        .is_none_or(|sel| sel.iter().all(|(k, v)| labels(k, v)))
            })
            .min_by(|a, b| a.created.cmp(&b.created).then_with(|| a.name.cmp(&b.name)))
    };
    if let Some(p) = oldest(namespace, true) {
        if let Some(port) = port
            && let Some((_, m)) = p.ports.iter().find(|(pp, _)| *pp == port as u32)
            && *m != Mode::Unset
        {
            return EffectiveMode {
                mode: *m,
                source: ModeSource::WorkloadPort,
                policy: Some(p.id()),
            };
        }
        if p.mode != Mode::Unset {
            return EffectiveMode {
                mode: p.mode,
                source: ModeSource::Workload,
                policy: Some(p.id()),
            };
        }
    }
    if let Some(p) = oldest(namespace, false)
        && p.mode != Mode::Unset
    {
        return EffectiveMode {
            mode: p.mode,
            source: ModeSource::Namespace,
            policy: Some(p.id()),
        };
    }
    if let Some(p) = oldest(root_namespace, false)
        && p.mode != Mode::Unset
    {
        return EffectiveMode {
            mode: p.mode,
            source: ModeSource::Mesh,
            policy: Some(p.id()),
        };
    }
    EffectiveMode {
        mode: Mode::Permissive,
        source: ModeSource::Default,
        policy: None,
    }
}

/// A set of rules with a root namespace: the known policies plus, for a what-if, the assumed
/// ones (which replace known ones of the same namespace/name).
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub root_namespace: String,
    pub rules: Vec<Rule>,
}

impl PolicySet {
    pub fn new(root_namespace: &str) -> Self {
        Self {
            root_namespace: root_namespace.to_owned(),
            rules: Vec::new(),
        }
    }

    /// Adds `rule`, replacing one with the same namespace and name.
    pub fn apply(&mut self, rule: Rule) {
        self.rules
            .retain(|r| !(r.namespace == rule.namespace && r.name == rule.name));
        self.rules.push(rule);
    }

    /// The effective mode for a workload with `labels` (its pods' labels) in `namespace`.
    pub fn effective(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
        port: Option<u16>,
    ) -> EffectiveMode {
        effective(
            &self.root_namespace,
            namespace,
            |ns| {
                self.rules
                    .iter()
                    .filter(|r| r.namespace == ns)
                    .collect::<Vec<_>>()
            },
            |k, v| labels.get(k).is_some_and(|x| x == v),
            port,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn rule(ns: &str, name: &str, sel: Option<&[(&str, &str)]>, mode: Mode, created: i64) -> Rule {
        Rule {
            namespace: ns.into(),
            name: name.into(),
            selector: sel.map(|s| {
                s.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            mode,
            ports: vec![],
            created,
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn precedence_workload_over_namespace_over_mesh() {
        let web = labels(&[("app", "web")]);
        let mut set = PolicySet::new(DEFAULT_ROOT_NAMESPACE);
        let at = |s: &PolicySet, port| s.effective("shop", &web, port);
        // Nothing: Istio's default.
        assert_eq!(at(&set, Some(80)).mode, Mode::Permissive);
        assert_eq!(at(&set, Some(80)).source, ModeSource::Default);
        // Mesh-wide in the root namespace.
        set.apply(rule("istio-system", "default", None, Mode::Strict, 1));
        assert_eq!(
            (at(&set, Some(80)).mode, at(&set, Some(80)).source),
            (Mode::Strict, ModeSource::Mesh)
        );
        // A policy with a selector in the root namespace is not mesh-wide.
        set.apply(rule(
            "istio-system",
            "sel",
            Some(&[("app", "web")]),
            Mode::Disable,
            0,
        ));
        assert_eq!(at(&set, Some(80)).source, ModeSource::Mesh);
        // Namespace over mesh.
        set.apply(rule("shop", "ns", None, Mode::Permissive, 2));
        assert_eq!(
            (at(&set, Some(80)).mode, at(&set, Some(80)).policy.clone()),
            (Mode::Permissive, Some("shop/ns".into()))
        );
        // Workload over namespace; a selector that does not match is ignored.
        set.apply(rule(
            "shop",
            "other",
            Some(&[("app", "db")]),
            Mode::Disable,
            3,
        ));
        set.apply(rule(
            "shop",
            "web",
            Some(&[("app", "web")]),
            Mode::Strict,
            4,
        ));
        assert_eq!(at(&set, Some(80)).source, ModeSource::Workload);
        assert_eq!(at(&set, Some(80)).mode, Mode::Strict);
        // A policy in another namespace never applies.
        set.apply(rule("other", "x", None, Mode::Disable, 0));
        assert_eq!(at(&set, Some(80)).mode, Mode::Strict);
    }

    #[test]
    fn unset_inherits_at_every_level() {
        let web = labels(&[("app", "web")]);
        let mut set = PolicySet::new("mesh-root");
        set.apply(rule("mesh-root", "mesh", None, Mode::Unset, 1));
        assert_eq!(
            set.effective("shop", &web, None).source,
            ModeSource::Default
        );
        set.apply(rule("mesh-root", "mesh", None, Mode::Strict, 1));
        set.apply(rule("shop", "ns", None, Mode::Unset, 1));
        assert_eq!(set.effective("shop", &web, None).source, ModeSource::Mesh);
        let mut wl = rule("shop", "web", Some(&[("app", "web")]), Mode::Unset, 1);
        wl.ports = vec![(8080, Mode::Unset)];
        set.apply(wl.clone());
        // Workload UNSET and port UNSET: the namespace (UNSET) → the mesh decides.
        assert_eq!(
            set.effective("shop", &web, Some(8080)).source,
            ModeSource::Mesh
        );
        set.apply(rule("shop", "ns", None, Mode::Disable, 1));
        assert_eq!(
            set.effective("shop", &web, Some(8080)),
            EffectiveMode {
                mode: Mode::Disable,
                source: ModeSource::Namespace,
                policy: Some("shop/ns".into())
            }
        );
        // Port-level set, workload UNSET: the port decides, other ports inherit.
        wl.ports = vec![(8080, Mode::Permissive)];
        set.apply(wl);
        set.apply(rule("shop", "ns", None, Mode::Strict, 1));
        assert_eq!(
            set.effective("shop", &web, Some(8080)).mode,
            Mode::Permissive
        );
        assert_eq!(set.effective("shop", &web, Some(9090)).mode, Mode::Strict);
        assert_eq!(
            set.effective("shop", &web, Some(9090)).source,
            ModeSource::Namespace
        );
    }

    #[test]
    fn port_level_over_workload_level_and_disable() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let mut set = PolicySet::new(DEFAULT_ROOT_NAMESPACE);
        set.apply(rule("istio-system", "default", None, Mode::Strict, 0));
        let mut wl = rule("shop", "web", Some(&[("app", "web")]), Mode::Strict, 1);
        wl.ports = vec![(8080, Mode::Disable), (8443, Mode::Permissive)];
        set.apply(wl);
        let e = set.effective("shop", &web, Some(8080));
        assert_eq!(
            (e.mode, e.source),
            (Mode::Disable, ModeSource::WorkloadPort)
        );
        assert_eq!(
            set.effective("shop", &web, Some(8443)).mode,
            Mode::Permissive
        );
        assert_eq!(set.effective("shop", &web, Some(9000)).mode, Mode::Strict);
        assert_eq!(
            set.effective("shop", &web, Some(9000)).source,
            ModeSource::Workload
        );
        // Two matching workload policies: the oldest wins (Istio), whatever the order given.
        set.apply(rule(
            "shop",
            "older",
            Some(&[("tier", "front")]),
            Mode::Permissive,
            0,
        ));
        assert_eq!(
            set.effective("shop", &web, Some(9000)).mode,
            Mode::Permissive
        );
        assert_eq!(
            set.effective("shop", &web, Some(9000)).policy.as_deref(),
            Some("shop/older")
        );
        // Replacing by name.
        set.apply(rule(
            "shop",
            "older",
            Some(&[("tier", "back")]),
            Mode::Permissive,
            0,
        ));
        assert_eq!(set.effective("shop", &web, Some(9000)).mode, Mode::Strict);
    }
}

//! PeerAuthentication YAML (`security.istio.io/v1`), read strictly: a field the API does not
//! have is an error, not silently ignored, because a misspelt `portLevelMTLS` would otherwise
//! turn a what-if into a lie. Written by `mtls-agent policy`, read by `report --assume-policy`.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Mode, Rule};

pub const API_VERSION: &str = "security.istio.io/v1";
const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Spec,
}

/// Object metadata. Fields the API server adds (`uid`, `resourceVersion`, …) are accepted, so
/// that `kubectl get -o yaml` output can be fed back; only these are used.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Container port (as a string key, as in JSON) → mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_level_mtls: Option<BTreeMap<String, Mtls>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

/// A bad policy file: the file, the document (1-based) and the field, in one line.
#[derive(Debug, thiserror::Error)]
#[error("{file}: document {document}: {field}: {message}")]
pub struct PolicyFileError {
    pub file: String,
    pub document: usize,
    pub field: String,
    pub message: String,
}

impl PeerAuthentication {
    /// A STRICT resource (`selector` none: namespace-wide) with `portLevelMtls` on `ports`.
    pub fn new(
        namespace: &str,
        name: &str,
        selector: Option<&BTreeMap<String, String>>,
        mode: Mode,
        ports: &[(u16, Mode)],
    ) -> Self {
        Self {
            api_version: API_VERSION.into(),
            kind: "PeerAuthentication".into(),
            metadata: Metadata {
                name: name.into(),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: Spec {
                selector: selector.map(|s| Selector {
                    match_labels: s.clone(),
                }),
                mtls: Some(Mtls { mode: Some(mode) }),
                port_level_mtls: (!ports.is_empty()).then(|| {
                    ports
                        .iter()
                        .map(|(p, m)| (p.to_string(), Mtls { mode: Some(*m) }))
                        .collect()
                }),
            },
        }
    }

    /// The rule for evaluation; a policy without namespace goes to `default_namespace` (as
    /// `kubectl apply` puts it in the current namespace).
    pub fn to_rule(&self, default_namespace: &str, created: i64) -> Rule {
        let mode_of = |m: &Option<Mtls>| m.as_ref().and_then(|m| m.mode).unwrap_or(Mode::Unset);
        Rule {
            namespace: self
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| default_namespace.to_owned()),
            name: self.metadata.name.clone(),
            selector: self
                .spec
                .selector
                .as_ref()
                .filter(|s| !s.match_labels.is_empty())
                .map(|s| s.match_labels.clone().into_iter().collect()),
            mode: mode_of(&self.spec.mtls),
            ports: self
                .spec
                .port_level_mtls
                .iter()
                .flatten()
                .filter_map(|(p, m)| Some((p.parse().ok()?, m.mode.unwrap_or(Mode::Unset))))
                .collect(),
            created,
        }
    }

    /// The checks Istio's validation makes beyond the field types: `(field, message)`.
    fn validate(&self) -> Result<(), (String, String)> {
        if !API_VERSIONS.contains(&self.api_version.as_str()) {
            return Err((
                "apiVersion".into(),
                format!(
                    "{:?} is not a PeerAuthentication version (expected {API_VERSION})",
                    self.api_version
                ),
            ));
        }
        if self.kind != "PeerAuthentication" {
            return Err((
                "kind".into(),
                format!("{:?}: only PeerAuthentication is understood", self.kind),
            ));
        }
        if self.metadata.name.is_empty() {
            return Err(("metadata.name".into(), "must not be empty".into()));
        }
        if let Some(ports) = &self.spec.port_level_mtls {
            let has_selector = self
                .spec
                .selector
                .as_ref()
                .is_some_and(|s| !s.match_labels.is_empty());
            if !has_selector {
                return Err((
                    "spec.portLevelMtls".into(),
                    "needs spec.selector (Istio honours port-level mTLS only for a workload selector)"
                        .into(),
                ));
            }
            for p in ports.keys() {
                if !p.parse::<u16>().is_ok_and(|n| n > 0) {
                    return Err((
                        format!("spec.portLevelMtls.{p}"),
                        "is not a port number (1-65535)".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Parses every YAML document of `text` (empty documents skipped). `file` names the source in
/// errors (`-` for stdin).
pub fn parse(file: &str, text: &str) -> Result<Vec<PeerAuthentication>, PolicyFileError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |field: String, message: String| PolicyFileError {
            file: file.to_owned(),
            document: i + 1,
            field,
            message,
        };
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| err("(document)".into(), one_line(&e.to_string())))?;
        if value.is_null() {
            continue;
        }
        let pa: PeerAuthentication = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "(document)".into()
            } else {
                path
            };
            err(field, one_line(&e.into_inner().to_string()))
        })?;
        pa.validate().map_err(|(f, m)| err(f, m))?;
        out.push(pa);
    }
    if out.is_empty() {
        return Err(PolicyFileError {
            file: file.to_owned(),
            document: 1,
            field: "(document)".into(),
            message: "no PeerAuthentication in it".into(),
        });
    }
    Ok(out)
}

/// One resource as a YAML document (without the `---` separator).
pub fn to_yaml(pa: &PeerAuthentication) -> String {
    serde_yaml::to_string(pa).expect("a PeerAuthentication serialises")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_writes() {
        let sel: BTreeMap<String, String> = [("app".to_string(), "web".to_string())].into();
        let pa = PeerAuthentication::new(
            "shop",
            "web",
            Some(&sel),
            Mode::Strict,
            &[(8080, Mode::Permissive)],
        );
        let text = to_yaml(&pa);
        assert!(text.contains("portLevelMtls"), "{text}");
        let back = parse("gen.yaml", &format!("# comment\n{text}---\n")).unwrap();
        assert_eq!(back, vec![pa.clone()]);
        let r = back[0].to_rule("x", 0);
        assert_eq!(r.namespace, "shop");
        assert_eq!(r.ports, vec![(8080, Mode::Permissive)]);
        assert_eq!(r.selector, Some(vec![("app".into(), "web".into())]));
    }

    #[test]
    fn errors_name_file_document_and_field() {
        let good = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {mtls: {mode: STRICT}}\n";
        let cases = [
            (
                format!("{good}---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: b}}\nspec: {{mtls: {{mode: STRICT, extra: 1}}}}\n"),
                "p.yaml: document 2: spec.mtls.extra: unknown field `extra`",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {portLevelMTLS: {}}\n".to_string(),
                "p.yaml: document 1: spec.portLevelMTLS: unknown field `portLevelMTLS`",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {mtls: {mode: STRIKT}}\n".to_string(),
                "p.yaml: document 1: spec.mtls.mode: unknown mTLS mode",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {portLevelMtls: {\"80\": {mode: DISABLE}}}\n".to_string(),
                "p.yaml: document 1: spec.portLevelMtls: needs spec.selector",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\nspec: {selector: {matchLabels: {app: a}}, portLevelMtls: {http: {mode: DISABLE}}}\n".to_string(),
                "p.yaml: document 1: spec.portLevelMtls.http: is not a port number",
            ),
            (
                "apiVersion: v1\nkind: PeerAuthentication\nmetadata: {name: a}\n".to_string(),
                "p.yaml: document 1: apiVersion:",
            ),
            (
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n".to_string(),
                "p.yaml: document 1: kind:",
            ),
            ("{a: [\n".to_string(), "p.yaml: document 1: (document):"),
            ("# nothing\n".to_string(), "p.yaml: document 1: (document): no PeerAuthentication"),
        ];
        for (text, want) in cases {
            let e = parse("p.yaml", &text).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
            assert!(!e.contains('\n'), "{e:?}");
        }
        // Fields the API server adds to metadata are fine (kubectl get -o yaml).
        let served = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: n, uid: x, resourceVersion: '5'}\nspec: {}\n";
        assert_eq!(
            parse("p", served).unwrap()[0].to_rule("z", 0).mode,
            Mode::Unset
        );
    }
}

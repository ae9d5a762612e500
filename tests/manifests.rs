//! deploy/ checks: CRD YAML equals what the types generate; every manifest survives a typed round trip.

use std::path::{Path, PathBuf};

use inferlane::crds;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

#[test]
fn checked_in_crds_match_the_types() {
    let update = std::env::var("UPDATE_CRDS").is_ok();
    for (name, yaml) in crds::crd_files() {
        let path = deploy().join("crds").join(name);
        if update {
            std::fs::write(&path, &yaml).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == yaml,
            "{} differs from the Rust types; regenerate with `UPDATE_CRDS=1 cargo test --test manifests`",
            path.display()
        );
    }
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml")
            && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            out.push(p);
        }
    }
}

/// Deserialises into `T` and back; anything the type does not know (a misspelled field) is lost
/// and shows up as a difference.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut diffs = Vec::new();
    diff("", doc, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("; "))
    }
}

fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => diff(&format!("{path}.{k}"), v, w, out),
                    None => out.push(format!(
                        "{path}.{k} was dropped (unknown or misspelled field)"
                    )),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), v, w, out);
            }
        }
        // YAML numbers vs. strings (quantities, int-or-string) compare by text.
        _ if a.to_string().trim_matches('"') == b.to_string().trim_matches('"') => {}
        _ => out.push(format!("{path}: {a} became {b}")),
    }
}

#[test]
fn every_manifest_survives_a_typed_round_trip() {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    assert!(!files.is_empty());
    let mut checked = 0;
    let mut errors = Vec::new();
    for f in &files {
        // Prometheus's own files (scrape config, rules, rule tests) are checked by promtool
        // in tests/observability.rs; only the PodMonitors there are Kubernetes objects.
        if f.starts_with(deploy().join("observability")) && !f.ends_with("podmonitors.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = match serde_yaml::Value::deserialize(doc).map(serde_json::to_value) {
                Ok(Ok(v)) => v,
                other => panic!("{}: not YAML: {other:?}", f.display()),
            };
            if v.is_null() {
                continue;
            }
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let api = v["apiVersion"].as_str().unwrap_or_default().to_string();
            let res = match (api.as_str(), kind.as_str()) {
                ("apps/v1", "Deployment") => round_trip::<Deployment>(&v),
                ("v1", "Service") => round_trip::<Service>(&v),
                ("v1", "ConfigMap") => round_trip::<ConfigMap>(&v),
                ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(&v),
                ("networking.k8s.io/v1", "NetworkPolicy") => {
                    round_trip::<k8s_openapi::api::networking::v1::NetworkPolicy>(&v)
                }
                ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(&v),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(&v),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(&v),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    round_trip::<ClusterRoleBinding>(&v)
                }
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                    round_trip::<CustomResourceDefinition>(&v)
                }
                ("inference.networking.k8s.io/v1", "InferencePool") => {
                    round_trip::<crds::v1::InferencePool>(&v)
                }
                ("inference.networking.x-k8s.io/v1alpha2", "InferencePool") => {
                    round_trip::<crds::v1alpha2::InferencePool>(&v)
                }
                ("inference.networking.x-k8s.io/v1alpha2", "InferenceModel") => {
                    round_trip::<crds::v1alpha2::InferenceModel>(&v)
                }
                ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective") => {
                    round_trip::<crds::v1alpha2::InferenceObjective>(&v)
                }
                // Gateway API and gateway providers' objects (deploy/*/components/provider-*)
                // have no Rust types here; check the basics only.
                ("gateway.networking.k8s.io/v1", _)
                | ("networking.gke.io/v1", _)
                | ("networking.istio.io/v1", "DestinationRule")
                | ("networking.istio.io/v1alpha3", "EnvoyFilter")
                | ("monitoring.coreos.com/v1", "PodMonitor") => {
                    if v["metadata"]["name"].is_string() && v["spec"].is_object() {
                        Ok(())
                    } else {
                        Err("needs metadata.name and spec".into())
                    }
                }
                _ => Err(format!("no check for {api} {kind}; add one")),
            };
            checked += 1;
            if let Err(e) = res {
                errors.push(format!("{} ({kind}): {e}", f.display()));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(checked >= 10, "only {checked} documents checked");
}

#[test]
fn service_ports_point_at_container_ports() {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    let mut services = Vec::new();
    let mut deployments = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value =
                serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
            match v["kind"].as_str() {
                Some("Service") => services.push(serde_json::from_value::<Service>(v).unwrap()),
                Some("Deployment") => {
                    deployments.push(serde_json::from_value::<Deployment>(v).unwrap())
                }
                _ => {}
            }
        }
    }
    assert!(!services.is_empty());
    for s in &services {
        let spec = s.spec.as_ref().unwrap();
        let selector = spec.selector.clone().unwrap_or_default();
        let pods: Vec<_> = deployments
            .iter()
            .filter_map(|d| d.spec.as_ref()?.template.spec.as_ref().map(|p| (d, p)))
            .filter(|(d, _)| {
                let labels = d
                    .spec
                    .as_ref()
                    .unwrap()
                    .template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone())
                    .unwrap_or_default();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .collect();
        let name = s.metadata.name.clone().unwrap_or_default();
        assert!(!pods.is_empty(), "Service {name} selects no Deployment");
        for port in spec.ports.clone().unwrap_or_default() {
            let target = port.target_port.clone();
            let found = pods.iter().any(|(_, p)| {
                p.containers
                    .iter()
                    .chain(p.init_containers.iter().flatten())
                    .any(|c| {
                        c.ports.iter().flatten().any(|cp| match &target {
                            Some(
                                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                                    n,
                                ),
                            ) => cp.name.as_deref() == Some(n.as_str()),
                            Some(
                                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n),
                            ) => cp.container_port == *n,
                            None => cp.container_port == port.port,
                        })
                    })
            });
            assert!(
                found,
                "Service {name} port {} has no matching container port",
                port.port
            );
        }
    }
}

use serde::Deserialize;

#[test]
fn epp_rbac_grants_what_discovery_watches() {
    let text = std::fs::read_to_string(deploy().join("epp/epp.yaml")).unwrap();
    let mut roles = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
        if v["kind"] == "Role" {
            roles.push(serde_json::from_value::<Role>(v).unwrap());
        }
    }
    assert_eq!(roles.len(), 1);
    let rules = roles[0].rules.clone().unwrap_or_default();
    for (group, resource) in inferlane::actors::kube_discovery::WATCHED {
        for verb in ["list", "watch"] {
            let granted = rules.iter().any(|r| {
                r.api_groups.iter().flatten().any(|g| g == group)
                    && r.resources.iter().flatten().any(|x| x == resource)
                    && r.verbs.iter().any(|v| v == verb)
            });
            assert!(
                granted,
                "the EPP Role does not grant {verb} on {group}/{resource}"
            );
        }
    }
    for verb in inferlane::actors::leader::LEASE_VERBS {
        let granted = rules.iter().any(|r| {
            r.api_groups
                .iter()
                .flatten()
                .any(|g| g == "coordination.k8s.io")
                && r.resources.iter().flatten().any(|x| x == "leases")
                && r.verbs.iter().any(|v| v == verb)
        });
        assert!(granted, "the EPP Role does not grant {verb} on leases");
    }
    let (g, res) = inferlane::actors::kube_discovery::STATUS_WRITTEN;
    assert!(
        rules
            .iter()
            .any(|r| r.api_groups.iter().flatten().any(|x| x == g)
                && r.resources.iter().flatten().any(|x| x == res)
                && r.verbs.iter().any(|v| v == "patch")),
        "the EPP Role does not grant patch on {g}/{res}"
    );
    // Least privilege: read-only, except the leader-election lease and model status.
    for r in &rules {
        let lease = r.resources.iter().flatten().all(|x| x == "leases")
            || (r.resources.iter().flatten().all(|x| x == res)
                && r.verbs.iter().all(|v| v == "patch"));
        for v in &r.verbs {
            assert!(
                ["get", "list", "watch"].contains(&v.as_str()) || lease,
                "write verb {v} granted on {:?}",
                r.resources
            );
        }
    }
}

/// The openAPIV3Schema of a shipped CRD, as a compiled JSON-schema validator.
fn crd_validator(file: &str) -> jsonschema::Validator {
    let crd: Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy().join("crds").join(file)).unwrap())
            .unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    jsonschema::validator_for(schema).unwrap()
}

/// The first validation error for `obj`, as `kubectl apply` would report it (`None`: accepted).
fn rejection(v: &jsonschema::Validator, obj: &Value) -> Option<String> {
    v.iter_errors(obj)
        .next()
        .map(|e| format!("{} at {}", e, e.instance_path()))
}

/// What upstream's CRDs reject at apply time, ours reject too (enums, required fields,
/// ranges): a typo like `criticality: critical` is an error, not a silent Standard.
#[test]
fn crd_schemas_reject_what_upstream_rejects() {
    let model = crd_validator("inference.networking.x-k8s.io_inferencemodels.yaml");
    let ok = serde_json::json!({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModel",
        "metadata": {"name": "food-review"},
        "spec": {"modelName": "food-review", "criticality": "Standard", "poolRef": {"name": "vllm-llama3-8b-instruct"},
                 "targetModels": [{"name": "food-review-1", "weight": 90}, {"name": "food-review-2", "weight": 10}]}});
    assert_eq!(rejection(&model, &ok), None);
    let with = |path: &[&str], v: Value| {
        let mut o = ok.clone();
        let mut cur = &mut o;
        for p in &path[..path.len() - 1] {
            cur = &mut cur[*p];
        }
        cur[path[path.len() - 1]] = v;
        o
    };
    let cases = [
        (
            with(&["spec", "criticality"], "critical".into()),
            "criticality",
        ),
        (
            with(
                &["spec", "targetModels"],
                serde_json::json!(
                    (0..11)
                        .map(|i| serde_json::json!({"name": format!("t{i}")}))
                        .collect::<Vec<_>>()
                ),
            ),
            "targetModels",
        ),
        (
            with(
                &["spec", "targetModels"],
                serde_json::json!([{"name": "a", "weight": 0}]),
            ),
            "weight",
        ),
        (
            with(
                &["spec", "targetModels"],
                serde_json::json!([{"weight": 1}]),
            ),
            "name",
        ),
        (with(&["spec", "modelName"], "".into()), "modelName"),
        (with(&["spec", "poolRef"], serde_json::json!({})), "name"),
    ];
    for (obj, field) in &cases {
        let e = rejection(&model, obj).unwrap_or_else(|| panic!("accepted: {obj}"));
        assert!(e.contains(field), "{field}: {e}");
    }
    let mut no_name = ok.clone();
    no_name["spec"].as_object_mut().unwrap().remove("modelName");
    assert!(rejection(&model, &no_name).unwrap().contains("modelName"));

    let pool = crd_validator("inference.networking.x-k8s.io_inferencepools.yaml");
    let ok = serde_json::json!({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool",
        "metadata": {"name": "p"}, "spec": {"targetPortNumber": 8000, "selector": {"app": "vllm"},
        "extensionRef": {"name": "p-epp", "failureMode": "FailClose"}}});
    assert_eq!(rejection(&pool, &ok), None);
    for (obj, field) in [
        (
            serde_json::json!({"targetPortNumber": 70000, "selector": {"app": "v"}, "extensionRef": {"name": "e"}}),
            "targetPortNumber",
        ),
        (
            serde_json::json!({"targetPortNumber": 8000, "selector": {}, "extensionRef": {"name": "e"}}),
            "selector",
        ),
        (
            serde_json::json!({"targetPortNumber": 8000, "selector": {"app": "v"}, "extensionRef": {"name": "e", "failureMode": "Open"}}),
            "failureMode",
        ),
        (
            serde_json::json!({"selector": {"app": "v"}, "extensionRef": {"name": "e"}}),
            "targetPortNumber",
        ),
    ] {
        let mut o = ok.clone();
        o["spec"] = obj;
        let e = rejection(&pool, &o).unwrap_or_else(|| panic!("accepted: {o}"));
        assert!(e.contains(field), "{field}: {e}");
    }

    let v1 = crd_validator("inference.networking.k8s.io_inferencepools.yaml");
    let ok = serde_json::json!({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {"app": "v"}}, "targetPorts": [{"number": 8000}],
        "endpointPickerRef": {"name": "p-epp", "port": {"number": 9002}}}});
    assert_eq!(rejection(&v1, &ok), None);
    for (spec, field) in [
        (
            serde_json::json!({"selector": {"matchLabels": {"app": "v"}}, "targetPorts": [], "endpointPickerRef": {"name": "e"}}),
            "targetPorts",
        ),
        (
            serde_json::json!({"selector": {"matchLabels": {"app": "v"}}, "targetPorts": [{"number": 0}], "endpointPickerRef": {"name": "e"}}),
            "number",
        ),
        (
            serde_json::json!({"selector": {"matchLabels": {"app": "v"}}, "targetPorts": [{"number": 1}], "appProtocol": "grpc", "endpointPickerRef": {"name": "e"}}),
            "appProtocol",
        ),
    ] {
        let mut o = ok.clone();
        o["spec"] = spec;
        let e = rejection(&v1, &o).unwrap_or_else(|| panic!("accepted: {o}"));
        assert!(e.contains(field), "{field}: {e}");
    }

    let rewrite = crd_validator("inference.networking.x-k8s.io_inferencemodelrewrites.yaml");
    let bad = serde_json::json!({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModelRewrite",
        "metadata": {"name": "r"}, "spec": {"poolRef": {"name": "p"},
        "rules": [{"matches": [{"model": {"type": "Prefix", "value": "llama"}}], "targets": [{"modelRewrite": "x"}]}]}});
    assert!(rejection(&rewrite, &bad).unwrap().contains("type"));

    // Every example and seed object shipped validates.
    let mut files = Vec::new();
    yaml_files(&deploy().join("examples"), &mut files);
    let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/seeds");
    yaml_files(&seeds, &mut files);
    let mut checked = 0;
    for f in files {
        for d in serde_yaml::Deserializer::from_str(&std::fs::read_to_string(&f).unwrap()) {
            use serde::Deserialize;
            let Some(doc) = Option::<Value>::deserialize(d).unwrap() else {
                continue;
            };
            let v = match (doc["apiVersion"].as_str(), doc["kind"].as_str()) {
                (Some("inference.networking.x-k8s.io/v1alpha2"), Some("InferenceModel")) => &model,
                (Some("inference.networking.x-k8s.io/v1alpha2"), Some("InferencePool")) => &pool,
                (Some("inference.networking.k8s.io/v1"), Some("InferencePool")) => &v1,
                _ => continue,
            };
            assert_eq!(rejection(v, &doc), None, "{}", f.display());
            checked += 1;
        }
    }
    assert!(checked >= 6, "{checked}");
}

/// `kubectl kustomize DIR` (kubectl carries kustomize), as JSON objects.
fn kustomize(dir: &Path) -> Vec<Value> {
    let out = std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(dir)
        .output()
        .expect("kubectl (with kustomize) must be installed to render deploy/installs/");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.contains("POOL_NAME") && !text.contains("POOL_APP") && !text.contains("BASE_MODEL"),
        "a placeholder was left unfilled in {}:\n{text}",
        dir.display()
    );
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            use serde::Deserialize;
            Value::deserialize(d).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {objs:#?}"))
}

/// An install with a provider component added exactly as a user would: the install's own
/// kustomization.yaml with the provider's commented line uncommented (so that line must be
/// valid YAML in place), written beside the installs (kustomize loads components only from
/// below a root). `edit` changes the text further (a namespace, say).
fn with_provider(install: &str, provider: &str, edit: &dyn Fn(String) -> String) -> PathBuf {
    let src = deploy().join("installs").join(install);
    let dir = deploy()
        .join("installs")
        .join(format!(".test-{install}-{}", provider.replace('/', "_")));
    std::fs::create_dir_all(&dir).unwrap();
    if src.join("values.yaml").exists() {
        std::fs::copy(src.join("values.yaml"), dir.join("values.yaml")).unwrap();
    }
    let text = std::fs::read_to_string(src.join("kustomization.yaml")).unwrap();
    let commented = format!("# - ../../{provider}\n");
    assert!(
        text.contains(&commented),
        "{install}: no commented line {commented:?} to uncomment"
    );
    let k = text.replace(&commented, &format!("- ../../{provider}\n"));
    std::fs::write(dir.join("kustomization.yaml"), edit(k)).unwrap();
    dir
}

fn same(k: String) -> String {
    k
}

/// Each `helm install ... --set ...` of seed 000 has a kustomize install in deploy/installs/
/// that renders what the chart would: names, labels, the EPP's flags, the HTTPRoute on the
/// base model header, and the provider's objects.
#[test]
fn kustomize_installs_render_the_seeds_helm_values() {
    let model = crd_validator("inference.networking.k8s.io_inferencepools.yaml");
    for (pool, base) in [
        ("vllm-deepseek-r1", "deepseek/vllm-deepseek-r1"),
        (
            "vllm-llama3-8b-instruct",
            "meta-llama/Llama-3.1-8B-Instruct",
        ),
    ] {
        let objs = kustomize(&deploy().join("installs").join(pool));
        let ip = find(&objs, "InferencePool");
        assert_eq!(ip["metadata"]["name"], pool);
        assert_eq!(ip["spec"]["selector"]["matchLabels"]["app"], pool);
        assert_eq!(ip["spec"]["targetPorts"][0]["number"], 8000);
        assert_eq!(
            ip["spec"]["endpointPickerRef"]["name"],
            format!("{pool}-epp")
        );
        assert_eq!(rejection(&model, ip), None);
        let dep = find(&objs, "Deployment");
        assert_eq!(dep["metadata"]["name"], format!("{pool}-epp"));
        let spec = &dep["spec"]["template"]["spec"];
        assert_eq!(
            spec["containers"][0]["args"][0],
            format!("--pool-name={pool}")
        );
        assert_eq!(spec["serviceAccountName"], format!("{pool}-epp"));
        assert_eq!(
            spec["volumes"][0]["configMap"]["name"],
            format!("{pool}-epp")
        );
        let labels = &dep["spec"]["template"]["metadata"]["labels"];
        assert_eq!(dep["spec"]["selector"]["matchLabels"], *labels);
        let svc = find(&objs, "Service");
        assert_eq!(svc["metadata"]["name"], format!("{pool}-epp"));
        assert_eq!(svc["spec"]["selector"], *labels);
        // The lease rule names this pool's lease only (what the leader elector uses).
        let lease_rule = find(&objs, "Role")["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resources"][0] == "leases" && r["verbs"][0] == "get")
            .cloned()
            .unwrap();
        assert_eq!(
            lease_rule["resourceNames"],
            json!([format!("{pool}-epp-leader")])
        );
        let rb = find(&objs, "RoleBinding");
        assert_eq!(rb["subjects"][0]["name"], format!("{pool}-epp"));
        assert_eq!(rb["roleRef"]["name"], format!("{pool}-epp"));
        let route = find(&objs, "HTTPRoute");
        assert_eq!(route["metadata"]["name"], pool);
        let rule = &route["spec"]["rules"][0];
        assert_eq!(
            rule["matches"][0]["headers"][0]["name"],
            "X-Gateway-Base-Model-Name"
        );
        assert_eq!(rule["matches"][0]["headers"][0]["value"], base);
        assert_eq!(rule["backendRefs"][0]["name"], pool);
        assert!(
            objs.iter().all(
                |o| o["kind"] != "ConfigMap" || o["metadata"]["name"] != "inferencepool-values"
            ),
            "the values object is local-config and never applied"
        );
        for o in &objs {
            let res = match o["kind"].as_str().unwrap() {
                "Deployment" => round_trip::<Deployment>(o),
                "Service" => round_trip::<Service>(o),
                "ConfigMap" => round_trip::<ConfigMap>(o),
                "ServiceAccount" => round_trip::<ServiceAccount>(o),
                "Role" => round_trip::<Role>(o),
                "RoleBinding" => round_trip::<RoleBinding>(o),
                "InferencePool" => round_trip::<crds::v1::InferencePool>(o),
                _ => Ok(()),
            };
            assert_eq!(res, Ok(()), "{o}");
        }
        // --set provider.name=gke / istio.
        let gke = kustomize(&with_provider(
            pool,
            "inferencepool/components/provider-gke",
            &same,
        ));
        for kind in ["HealthCheckPolicy", "GCPBackendPolicy"] {
            assert_eq!(find(&gke, kind)["spec"]["targetRef"]["name"], pool);
        }
        assert_eq!(
            find(&gke, "GCPBackendPolicy")["spec"]["default"]["timeoutSec"],
            300
        );
        // As upstream's chart renders it for GKE: no route timeouts (GKE takes the backend
        // policy's), and ext_proc open to GKE's managed proxies.
        assert_eq!(
            rule["timeouts"]["request"], "300s",
            "non-GKE routes keep 300 s"
        );
        let gke_rule = &find(&gke, "HTTPRoute")["spec"]["rules"][0];
        assert!(gke_rule.get("timeouts").is_none(), "{gke_rule}");
        let np = find(&gke, "NetworkPolicy");
        let cidrs: Vec<&str> = np["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["ports"][0]["port"] == 9002)
            .flat_map(|r| r["from"].as_array().unwrap())
            .filter_map(|f| f["ipBlock"]["cidr"].as_str())
            .collect();
        assert_eq!(
            cidrs,
            ["10.129.0.0/23", "35.191.0.0/16", "130.211.0.0/22"],
            "{np}"
        );
        let crb = objs
            .iter()
            .find(|o| o["kind"] == "ClusterRoleBinding")
            .expect("--metrics-endpoint-auth needs the review grants");
        assert_eq!(crb["subjects"][0]["name"], format!("{pool}-epp"));
        assert_eq!(crb["roleRef"]["name"], crb["metadata"]["name"]);
        let istio = kustomize(&with_provider(
            pool,
            "inferencepool/components/provider-istio",
            &same,
        ));
        assert_eq!(
            find(&istio, "DestinationRule")["spec"]["host"],
            format!("{pool}-epp")
        );
    }
    // Seed 002 (kgateway, v0.2.0 CRDs) with our EPP: the seed's v1alpha2 pool names our EPP
    // Service, which watches that group; the seed's model and route come along.
    let kg = kustomize(&deploy().join("installs/kgateway-qwen-pool"));
    let pools: Vec<&Value> = kg.iter().filter(|o| o["kind"] == "InferencePool").collect();
    assert_eq!(pools.len(), 1, "{pools:?}");
    assert_eq!(
        pools[0]["apiVersion"],
        "inference.networking.x-k8s.io/v1alpha2"
    );
    assert_eq!(pools[0]["spec"]["extensionRef"]["name"], "qwen-pool-epp");
    assert_eq!(
        rejection(
            &crd_validator("inference.networking.x-k8s.io_inferencepools.yaml"),
            pools[0]
        ),
        None
    );
    let args = &find(&kg, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"];
    assert_eq!(args[0], "--pool-name=qwen-pool");
    assert_eq!(args[2], "--pool-group=inference.networking.x-k8s.io");
    assert_eq!(find(&kg, "Service")["metadata"]["name"], "qwen-pool-epp");
    assert_eq!(find(&kg, "Service")["spec"]["ports"][0]["port"], 9002);
    assert_eq!(
        find(&kg, "InferenceModel")["spec"]["poolRef"]["name"],
        "qwen-pool"
    );
    assert_eq!(find(&kg, "Gateway")["spec"]["gatewayClassName"], "kgateway");
    let backend = &find(&kg, "HTTPRoute")["spec"]["rules"][0]["backendRefs"][0];
    assert_eq!(
        (&backend["group"], &backend["name"]),
        (&json!("inference.networking.x-k8s.io"), &json!("qwen-pool"))
    );
    // The one-shot `kubectl apply -k deploy/` (docs/deploying.md) renders too.
    let all = kustomize(&deploy());
    assert!(all.iter().any(|o| o["kind"] == "CustomResourceDefinition"));
    let bbr = kustomize(&deploy().join("installs/body-based-router"));
    assert_eq!(
        find(&bbr, "Deployment")["metadata"]["name"],
        "body-based-router"
    );
    assert_eq!(find(&bbr, "Role")["rules"][0]["resources"][0], "configmaps");
    let gke = kustomize(&with_provider(
        "body-based-router",
        "bbr/components/provider-gke",
        &same,
    ));
    let ext = &find(&gke, "GCPRoutingExtension")["spec"]["extensionChains"][0]["extensions"][0];
    assert_eq!(ext["backendRef"]["name"], "body-based-router");
    assert_eq!(ext["backendRef"]["port"], 9004);
    // GKE health-checks bbr over gRPC on its health port, as upstream's chart.
    let hc = &find(&gke, "HealthCheckPolicy")["spec"];
    assert_eq!(hc["default"]["config"]["type"], "GRPC");
    assert_eq!(hc["default"]["config"]["grpcHealthCheck"]["port"], 9005);
    assert_eq!(hc["targetRef"]["name"], "body-based-router");
    // Istio, installed into another namespace: the EnvoyFilter's cluster and the
    // DestinationRule (TLS to bbr, as upstream's chart ships) name that namespace.
    let istio = kustomize(&with_provider(
        "body-based-router",
        "bbr/components/provider-istio",
        &|k: String| k.replace("namespace: default", "namespace: ai-gateway"),
    ));
    let ef = find(&istio, "EnvoyFilter").to_string();
    assert!(
        ef.contains("outbound|9004||body-based-router.ai-gateway.svc.cluster.local")
            && !ef.contains(".default.")
            && !ef.contains("NAMESPACE"),
        "{ef}"
    );
    let dr = find(&istio, "DestinationRule");
    assert_eq!(
        dr["spec"]["host"],
        "body-based-router.ai-gateway.svc.cluster.local"
    );
    assert_eq!(dr["spec"]["trafficPolicy"]["tls"]["mode"], "SIMPLE");
}

/// Our containers run under the runtime's default seccomp profile, and the EPP's ext_proc
/// port admits only the gateway.
#[test]
fn our_pods_run_with_seccomp_and_the_epp_admits_only_the_gateway() {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    let mut ours = 0;
    let mut policies = 0;
    let mut epp_policies = 0;
    let mut server_policies = 0;
    for f in files
        .iter()
        .filter(|f| !f.to_string_lossy().contains("/.test-"))
    {
        for d in serde_yaml::Deserializer::from_str(&std::fs::read_to_string(f).unwrap()) {
            let v = serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap();
            if v["kind"] == "NetworkPolicy" {
                policies += 1;
                let rule = &v["spec"]["ingress"][0];
                let gateway = &rule["from"][0];
                assert_eq!(
                    gateway["podSelector"]["matchLabels"]["gateway.networking.k8s.io/gateway-name"],
                    "inference-gateway"
                );
                // The gateway's pods in the gateway's namespace, not any pod that labels
                // itself so in any namespace.
                assert!(
                    gateway["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                        .is_string(),
                    "{}: {gateway}",
                    f.display()
                );
                let port = &rule["ports"][0]["port"];
                if port == 9002 {
                    epp_policies += 1;
                } else {
                    // A model server's: its port admits the gateway, the pool's EPP and
                    // monitoring, nothing else (vLLM's admin routes live on it).
                    assert_eq!(port, 8000, "{}", f.display());
                    assert_eq!(
                        rule["from"].as_array().map(Vec::len),
                        Some(3),
                        "{}",
                        f.display()
                    );
                    server_policies += 1;
                }
            }
            if v["kind"] != "Deployment" {
                continue;
            }
            let pod = &v["spec"]["template"]["spec"];
            let containers = pod["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(pod["initContainers"].as_array().into_iter().flatten());
            for c in containers {
                let image = c["image"].as_str().unwrap_or_default();
                if !image.contains("inferlane") {
                    continue;
                }
                ours += 1;
                let seccomp = c["securityContext"]["seccompProfile"]["type"]
                    .as_str()
                    .or(pod["securityContext"]["seccompProfile"]["type"].as_str());
                assert_eq!(
                    seccomp,
                    Some("RuntimeDefault"),
                    "{} {}",
                    f.display(),
                    c["name"]
                );
            }
        }
    }
    assert!(ours >= 5, "{ours}");
    assert!(policies >= 4, "{policies}");
    assert!(
        epp_policies >= 2 && server_policies >= 2,
        "{epp_policies} {server_policies}"
    );
}

/// The LoRA fleet components: the EPP mounts the pool's adapters ConfigMap and reads it as
/// its catalogue, the sidecars' service account may read /lora/v1/placement, and each sidecar
/// asks the EPP's Service by its pod name.
#[test]
fn lora_fleet_components_wire_the_epp_and_the_sidecars() {
    let dir = with_provider(
        "vllm-llama3-8b-instruct",
        "inferencepool/components/lora-fleet",
        &same,
    );
    let objs = kustomize(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let epp = objs
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("the EPP");
    let spec = &epp["spec"]["template"]["spec"];
    let args: Vec<&str> = spec["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.contains(&"--lora-catalog=/lora/configmap.yaml"),
        "{args:?}"
    );
    let vol = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "lora-catalog")
        .unwrap();
    assert_eq!(
        vol["configMap"]["name"], "vllm-llama3-8b-instruct-adapters",
        "the ConfigMap deploy/vllm ships"
    );
    let role = objs
        .iter()
        .find(|o| {
            o["kind"] == "ClusterRole"
                && o["metadata"]["name"] == "vllm-llama3-8b-instruct-lora-placement"
        })
        .expect("the placement reader role");
    assert_eq!(role["rules"][0]["nonResourceURLs"][0], "/lora/v1/placement");
    // Replicas elect the decider on their pool's lease, advertise their pod's address, and
    // may read the decider's table and post it their demand.
    assert!(args.contains(&"--lora-placement-election"), "{args:?}");
    let env = spec["containers"][0]["env"].as_array().unwrap();
    assert!(
        env.iter()
            .any(|e| e["name"] == "POD_IP"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"),
        "{env:?}"
    );
    let lease = objs
        .iter()
        .find(|o| {
            o["kind"] == "Role"
                && o["metadata"]["name"] == "vllm-llama3-8b-instruct-epp-lora-placement"
        })
        .expect("the placement lease role");
    assert_eq!(
        lease["rules"][0]["resourceNames"][0],
        "vllm-llama3-8b-instruct-epp-lora-placement"
    );
    let binding = objs
        .iter()
        .find(|o| {
            o["kind"] == "ClusterRoleBinding"
                && o["metadata"]["name"] == "vllm-llama3-8b-instruct-epp-lora-replicas"
        })
        .expect("the replicas' binding");
    assert_eq!(
        binding["subjects"][0]["name"],
        "vllm-llama3-8b-instruct-epp"
    );
    assert_eq!(
        binding["roleRef"]["name"],
        "vllm-llama3-8b-instruct-epp-lora-replicas"
    );
    // The model servers' side.
    let side = deploy().join(".test-vllm-lora-fleet");
    std::fs::create_dir_all(&side).unwrap();
    std::fs::write(
        side.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- ../vllm\ncomponents:\n- ../vllm/components/lora-fleet\n",
    )
    .unwrap();
    let objs = kustomize(&side);
    let _ = std::fs::remove_dir_all(&side);
    let vllm = find(&objs, "Deployment");
    let sidecar = &vllm["spec"]["template"]["spec"]["initContainers"][0];
    let args = sidecar["args"].to_string();
    assert!(
        args.contains("--placement-url=http://vllm-llama3-8b-instruct-epp:9090/lora/v1/placement"),
        "{args}"
    );
    let env = sidecar["env"].to_string();
    assert!(
        env.contains("POD_NAME") && env.contains("metadata.name"),
        "{env}"
    );
}

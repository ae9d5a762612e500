//! Gateway API Inference Extension resources as Rust types; `deploy/crds/` is generated from them.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `inference.networking.k8s.io/v1` (GA).
pub mod v1 {
    use super::*;

    /// Which pods are endpoints: `matchLabels` only.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct LabelSelector {
        #[schemars(extend("minProperties" = 1, "maxProperties" = 64))]
        pub match_labels: BTreeMap<String, String>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Port {
        #[schemars(range(min = 1, max = 65535))]
        pub number: i32,
    }

    /// How the gateway reaches the EPP.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct EndpointPickerRef {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub group: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub kind: Option<String>,
        #[schemars(length(min = 1, max = 253))]
        pub name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub port: Option<Port>,
        /// `FailOpen` or `FailClose` (default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("enum" = ["FailOpen", "FailClose"]))]
        pub failure_mode: Option<String>,
    }

    /// InferencePool: a set of model-server pods and the EPP that picks among them.
    #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "inference.networking.k8s.io",
        version = "v1",
        kind = "InferencePool",
        plural = "inferencepools",
        namespaced,
        status = "InferencePoolStatus"
    )]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct InferencePoolSpec {
        pub selector: LabelSelector,
        /// 1-8 ports; each port of a pod is its own endpoint.
        #[schemars(length(min = 1, max = 8))]
        pub target_ports: Vec<Port>,
        /// `http` or `kubernetes.io/h2c`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("enum" = ["http", "kubernetes.io/h2c"]))]
        pub app_protocol: Option<String>,
        pub endpoint_picker_ref: EndpointPickerRef,
    }

    /// Written by gateways, not by the EPP.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct InferencePoolStatus {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub parents: Vec<serde_json::Value>,
    }
}

/// `inference.networking.x-k8s.io/v1alpha2` (the seeds' version) and the newer alpha kinds.
pub mod v1alpha2 {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ExtensionRef {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub group: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub kind: Option<String>,
        #[schemars(length(min = 1, max = 253))]
        pub name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(range(min = 1, max = 65535))]
        pub port_number: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("enum" = ["FailOpen", "FailClose"]))]
        pub failure_mode: Option<String>,
    }

    /// InferencePool, v1alpha2 shape.
    #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferencePool",
        plural = "inferencepools",
        namespaced,
        status = "ObjectStatus"
    )]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct InferencePoolSpec {
        #[schemars(extend("minProperties" = 1, "maxProperties" = 64))]
        pub selector: BTreeMap<String, String>,
        #[schemars(range(min = 1, max = 65535))]
        pub target_port_number: i32,
        pub extension_ref: ExtensionRef,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct PoolRef {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub group: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub kind: Option<String>,
        #[schemars(length(min = 1, max = 253))]
        pub name: String,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct TargetModel {
        #[schemars(length(min = 1, max = 253))]
        pub name: String,
        /// 1 - 1,000,000; set on every target or on none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(range(min = 1, max = 1000000))]
        pub weight: Option<i32>,
    }

    /// Conditions written by controllers (kept as they come).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
    #[serde(rename_all = "camelCase")]
    pub struct ObjectStatus {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub conditions: Vec<serde_json::Value>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub parents: Vec<serde_json::Value>,
    }

    /// InferenceModel: what clients call a model, its criticality and weighted targets.
    #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferenceModel",
        plural = "inferencemodels",
        namespaced,
        status = "ObjectStatus"
    )]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct InferenceModelSpec {
        #[schemars(length(min = 1, max = 256))]
        pub model_name: String,
        /// `Critical`, `Standard` or `Sheddable`.
        // A string, not an enum: an object written under a CRD without this check (upstream's
        // older ones) must not break the EPP's watch; the EPP ignores it and says why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("enum" = ["Critical", "Standard", "Sheddable"]))]
        pub criticality: Option<String>,
        pub pool_ref: PoolRef,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schemars(length(max = 10))]
        pub target_models: Vec<TargetModel>,
    }

    /// InferenceObjective: a priority selected by `x-gateway-inference-objective`.
    #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferenceObjective",
        plural = "inferenceobjectives",
        namespaced,
        status = "ObjectStatus"
    )]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct InferenceObjectiveSpec {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub priority: Option<i32>,
        pub pool_ref: PoolRef,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct ModelMatch {
        /// Only `Exact`.
        #[serde(rename = "type")]
        #[schemars(extend("enum" = ["Exact"]))]
        pub kind: String,
        #[schemars(length(min = 1, max = 256))]
        pub value: String,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct RewriteMatch {
        pub model: ModelMatch,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct RewriteTarget {
        #[schemars(length(min = 1, max = 256))]
        pub model_rewrite: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(range(min = 1, max = 1000000))]
        pub weight: Option<i32>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct RewriteRule {
        #[schemars(length(min = 1, max = 16))]
        pub matches: Vec<RewriteMatch>,
        #[schemars(length(min = 1, max = 10))]
        pub targets: Vec<RewriteTarget>,
    }

    /// InferenceModelRewrite: exact model names rewritten to weighted targets.
    #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferenceModelRewrite",
        plural = "inferencemodelrewrites",
        namespaced,
        status = "ObjectStatus"
    )]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct InferenceModelRewriteSpec {
        pub pool_ref: PoolRef,
        pub rules: Vec<RewriteRule>,
    }
}

/// Every CRD this project ships, as `(file name, YAML)`, generated from the types above.
pub fn crd_files() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    let to_yaml = |crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        serde_yaml::to_string(crd).expect("CRDs serialise")
    };
    vec![
        (
            "inference.networking.k8s.io_inferencepools.yaml",
            to_yaml(&v1::InferencePool::crd()),
        ),
        (
            "inference.networking.x-k8s.io_inferencepools.yaml",
            to_yaml(&v1alpha2::InferencePool::crd()),
        ),
        (
            "inference.networking.x-k8s.io_inferencemodels.yaml",
            to_yaml(&v1alpha2::InferenceModel::crd()),
        ),
        (
            "inference.networking.x-k8s.io_inferenceobjectives.yaml",
            to_yaml(&v1alpha2::InferenceObjective::crd()),
        ),
        (
            "inference.networking.x-k8s.io_inferencemodelrewrites.yaml",
            to_yaml(&v1alpha2::InferenceModelRewrite::crd()),
        ),
    ]
}

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
        pub match_labels: BTreeMap<String, String>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct Port {
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
        pub name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub port: Option<Port>,
        /// `FailOpen` or `FailClose` (default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
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
        pub target_ports: Vec<Port>,
        /// `http` or `kubernetes.io/h2c`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
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
        pub name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub port_number: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub failure_mode: Option<String>,
    }

    /// InferencePool, v1alpha2 shape.
    #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferencePool",
        plural = "inferencepools",
        namespaced
    )]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct InferencePoolSpec {
        pub selector: BTreeMap<String, String>,
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
        pub name: String,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct TargetModel {
        pub name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub weight: Option<i32>,
    }

    /// InferenceModel: what clients call a model, its criticality and weighted targets.
    #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferenceModel",
        plural = "inferencemodels",
        namespaced
    )]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct InferenceModelSpec {
        pub model_name: String,
        /// `Critical`, `Standard` or `Sheddable`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub criticality: Option<String>,
        pub pool_ref: PoolRef,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub target_models: Vec<TargetModel>,
    }

    /// InferenceObjective: a priority selected by `x-gateway-inference-objective`.
    #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferenceObjective",
        plural = "inferenceobjectives",
        namespaced
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
        pub kind: String,
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
        pub model_rewrite: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub weight: Option<i32>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct RewriteRule {
        pub matches: Vec<RewriteMatch>,
        pub targets: Vec<RewriteTarget>,
    }

    /// InferenceModelRewrite: exact model names rewritten to weighted targets.
    #[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferenceModelRewrite",
        plural = "inferencemodelrewrites",
        namespaced
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

//! InferenceModels, Objectives and ModelRewrites into the pool's rules (oldest wins a name), and why an object is ignored, written to its status.

use std::collections::BTreeMap;

use actix::prelude::*;
use inferlane_epp::RuleError;
use inferlane_epp::rules::{
    Criticality, ModelRule, ModelRules, Objective, RewriteRule, TargetModel,
};
use kube::{Api, ResourceExt};

use super::KubeDiscovery;
use super::pool::{GROUP_V1, unknown_models_for};
use crate::actors::datastore::RulesChanged;
use crate::crds::v1alpha2;

impl KubeDiscovery {
    pub(super) fn publish_rules(&mut self, ctx: &mut Context<Self>) {
        let pool = &self.target.name;
        // Oldest first, so the oldest object wins a conflict over a model name (as upstream);
        // a newer duplicate that any namespace user can create never takes a model over.
        let mut objects: Vec<&v1alpha2::InferenceModel> = self
            .models
            .objects
            .values()
            .filter(|m| m.spec.pool_ref.name == *pool)
            .collect();
        objects.sort_by(|a, b| {
            (&a.metadata.creation_timestamp, a.name_any())
                .cmp(&(&b.metadata.creation_timestamp, b.name_any()))
        });
        let mut rejected: Vec<String> = Vec::new();
        // InferenceModel name -> (reason, message) for the Accepted=False condition.
        let mut refused: BTreeMap<String, (&'static str, String)> = BTreeMap::new();
        let mut kept: Vec<&v1alpha2::InferenceModel> = Vec::new();
        let all_names: Vec<String> = objects.iter().map(|m| m.name_any()).collect();
        for m in objects {
            match m.spec.criticality.as_deref() {
                None | Some("Critical" | "Standard" | "Sheddable") => kept.push(m),
                Some(other) => {
                    let msg =
                        format!("criticality {other:?} is not Critical, Standard or Sheddable");
                    rejected.push(format!("InferenceModel {}: {msg}", m.name_any()));
                    refused.insert(m.name_any(), ("Invalid", msg));
                }
            }
        }
        let models: Vec<ModelRule> = kept
            .iter()
            .map(|m| ModelRule {
                model_name: m.spec.model_name.clone(),
                criticality: m.spec.criticality.as_deref().map(|c| match c {
                    "Critical" => Criticality::Critical,
                    "Sheddable" => Criticality::Sheddable,
                    _ => Criticality::Standard,
                }),
                target_models: m
                    .spec
                    .target_models
                    .iter()
                    .map(|t| target(&t.name, t.weight))
                    .collect(),
            })
            .collect();
        let objectives: Vec<Objective> = self
            .objectives
            .objects
            .values()
            .filter(|o| o.spec.pool_ref.name == *pool)
            .map(|o| Objective {
                name: o.name_any(),
                priority: o.spec.priority.unwrap_or(0),
            })
            .collect();
        let rewrite_objects: Vec<&v1alpha2::InferenceModelRewrite> = self
            .rewrites
            .objects
            .values()
            .filter(|r| r.spec.pool_ref.name == *pool)
            .collect();
        let mut rewrite_owner = Vec::new();
        let rewrites: Vec<RewriteRule> = rewrite_objects
            .iter()
            .flat_map(|r| r.spec.rules.iter().map(move |rule| (r.name_any(), rule)))
            .map(|(owner, rule)| {
                rewrite_owner.push(owner);
                RewriteRule {
                    matches: rule.matches.iter().map(|m| m.model.value.clone()).collect(),
                    targets: rule
                        .targets
                        .iter()
                        .map(|t| target(&t.model_rewrite, t.weight))
                        .collect(),
                }
            })
            .collect();
        let n_models = kept.len();
        let unknown = unknown_models_for(self.pool_group().unwrap_or(GROUP_V1));
        let (rules, bad) = ModelRules::lenient(models, objectives, rewrites, unknown);
        for (i, e) in bad {
            rejected.push(if i < n_models {
                let m = kept[i];
                match e {
                    RuleError::Duplicate(name) => {
                        let owner = kept
                            .iter()
                            .find(|o| o.spec.model_name == name)
                            .map(|o| o.name_any())
                            .unwrap_or_default();
                        refused.insert(
                            m.name_any(),
                            (
                                "ModelNameInUse",
                                format!("modelName {name:?} is already claimed by the older InferenceModel {owner:?}"),
                            ),
                        );
                        format!(
                            "InferenceModel {}: modelName {name:?} is already claimed by the older InferenceModel {owner:?}; this one is ignored until that one is deleted",
                            m.name_any()
                        )
                    }
                    e => {
                        refused.insert(m.name_any(), ("Invalid", e.to_string()));
                        format!("InferenceModel {}: {e}", m.name_any())
                    }
                }
            } else {
                format!(
                    "InferenceModelRewrite {}: {e}",
                    rewrite_owner.get(i - n_models).map(String::as_str).unwrap_or("?")
                )
            });
        }
        // Each rejection is logged when it first appears, not on every later event.
        for r in &rejected {
            if !self.last_rejected.contains(r) {
                tracing::error!(reason = %r, "model object ignored; every other rule stays in force");
            }
        }
        self.last_rejected = rejected;
        self.write_model_status(&all_names, refused, ctx);
        if self.last_rules.as_ref() != Some(&rules) {
            tracing::info!(models = rules.model_names().count(), "model rules changed");
            self.datastore.do_send(RulesChanged(rules.clone()));
            self.last_rules = Some(rules);
        }
    }
}

impl KubeDiscovery {
    /// Writes the `Accepted` condition of this pool's InferenceModels whose state changed:
    /// False (reason ModelNameInUse or Invalid) on the ones ignored, True once they are in
    /// force again, so `kubectl get inferencemodel -o yaml` says why one does not route.
    fn write_model_status(
        &mut self,
        names: &[String],
        refused: BTreeMap<String, (&'static str, String)>,
        ctx: &mut Context<Self>,
    ) {
        let mut writes = Vec::new();
        for name in names {
            // What the object carries now (written by us, another replica or an earlier run):
            // (accepted, reason, message).
            let current = self
                .models
                .objects
                .get(name)
                .and_then(|m| m.status.as_ref())
                .and_then(|st| st.conditions.iter().find(|c| c["type"] == "Accepted"))
                .map(|c| {
                    (
                        c["status"] == "True",
                        c["reason"].as_str().unwrap_or("").to_string(),
                        c["message"].as_str().unwrap_or("").to_string(),
                    )
                });
            let want = match refused.get(name) {
                Some((reason, msg)) => (false, reason.to_string(), msg.clone()),
                // Accepted ones are written only to clear an Accepted=False.
                None if current.as_ref().is_some_and(|(ok, _, _)| !ok) => {
                    (true, "Accepted".to_string(), String::new())
                }
                None => continue,
            };
            if current.as_ref() == Some(&want) || self.status_written.get(name) == Some(&want) {
                continue;
            }
            let (ok, reason, message) = &want;
            let patch = serde_json::json!({"status": {"conditions": [{
                "type": "Accepted",
                "status": if *ok { "True" } else { "False" },
                "reason": reason,
                "message": message,
                "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
            }]}});
            self.status_written.insert(name.clone(), want);
            writes.push((name.clone(), patch));
        }
        self.status_written.retain(|n, _| names.contains(n));
        if writes.is_empty() {
            return;
        }
        let api: Api<v1alpha2::InferenceModel> =
            Api::namespaced(self.client.clone(), &self.target.namespace);
        let fut = async move {
            let mut errors = Vec::new();
            for (name, patch) in writes {
                let pp = kube::api::PatchParams::default();
                if let Err(e) = api
                    .patch_status(&name, &pp, &kube::api::Patch::Merge(&patch))
                    .await
                {
                    errors.push(format!("{name}: {e}"));
                }
            }
            errors
        };
        ctx.spawn(fut.into_actor(self).map(|errors, act, _| {
            if errors.is_empty() {
                act.status_failing = false;
            } else if !act.status_failing {
                act.status_failing = true;
                tracing::warn!(errors = ?errors, "cannot write InferenceModel status (grant patch on inferencemodels/status); the reason is in this log only");
            }
        }));
    }
}

/// A weighted target from an object (a negative weight, which the CRD refuses, counts as 0).
fn target(name: &str, weight: Option<i32>) -> TargetModel {
    TargetModel {
        name: name.to_string(),
        weight: weight.map(|w| w.max(0) as u32),
    }
}

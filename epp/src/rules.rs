//! Model rules: InferenceModel criticality and weighted targets, InferenceObjective priority, rewrites.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// InferenceModel `spec.criticality`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Criticality {
    Critical,
    #[default]
    Standard,
    Sheddable,
}

impl Criticality {
    /// The priority this criticality stands for (sheddable < 0).
    pub fn priority(self) -> i32 {
        match self {
            Criticality::Critical => 1,
            Criticality::Standard => 0,
            Criticality::Sheddable => -1,
        }
    }
}

/// One weighted target (`targetModels[]` / rewrite `targets[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetModel {
    /// The model the server is asked for (alias `modelRewrite` in InferenceModelRewrite).
    #[serde(alias = "modelRewrite")]
    pub name: String,
    #[serde(default)]
    pub weight: Option<u32>,
}

/// InferenceModel (v1alpha2) semantics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelRule {
    /// What clients send as `model`.
    pub model_name: String,
    #[serde(default)]
    pub criticality: Option<Criticality>,
    #[serde(default)]
    pub target_models: Vec<TargetModel>,
}

/// InferenceObjective: a named priority selected by the `x-gateway-inference-objective` header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    pub name: String,
    #[serde(default)]
    pub priority: i32,
}

/// InferenceModelRewrite rule: exact model matches -> weighted targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteRule {
    /// Exact model names this rule applies to.
    pub matches: Vec<String>,
    pub targets: Vec<TargetModel>,
}

/// What to do with a model no rule mentions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum UnknownModelPolicy {
    /// Route it with default priority (upstream behaviour).
    #[default]
    Route,
    /// Answer 404.
    Reject,
}

/// A rule set is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RuleError {
    #[error("models[{index}] ({model}): weights must be set on all targetModels or on none")]
    MixedWeights { index: usize, model: String },
    #[error("models[{index}] ({model}): at most 10 targetModels, got {count}")]
    TooManyTargets {
        index: usize,
        model: String,
        count: usize,
    },
    #[error("models[{index}] ({model}): the weights add up to 0")]
    ZeroWeights { index: usize, model: String },
    #[error("model {0:?} is defined twice")]
    Duplicate(String),
    #[error("The model `{0}` does not exist: no InferenceModel names it in this pool")]
    UnknownModel(String),
    #[error("objective {0:?} (header x-gateway-inference-objective) does not exist")]
    UnknownObjective(String),
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// What the client asked for.
    pub requested: String,
    /// What the server will be asked for.
    pub target: String,
    pub priority: i32,
    pub objective: Option<String>,
}

impl Resolved {
    pub fn sheddable(&self) -> bool {
        self.priority < 0
    }
    pub fn rewritten(&self) -> bool {
        self.requested != self.target
    }
}

/// Every rule the EPP applies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelRules {
    models: HashMap<String, ModelRule>,
    objectives: HashMap<String, Objective>,
    rewrites: Vec<RewriteRule>,
    pub unknown_model: UnknownModelPolicy,
}

fn check_targets(index: usize, model: &str, t: &[TargetModel]) -> Result<(), RuleError> {
    if t.len() > 10 {
        return Err(RuleError::TooManyTargets {
            index,
            model: model.into(),
            count: t.len(),
        });
    }
    let weighted = t.iter().filter(|x| x.weight.is_some()).count();
    if weighted != 0 && weighted != t.len() {
        return Err(RuleError::MixedWeights {
            index,
            model: model.into(),
        });
    }
    if weighted > 0
        && t.iter()
            .map(|x| u64::from(x.weight.unwrap_or(0)))
            .sum::<u64>()
            == 0
    {
        return Err(RuleError::ZeroWeights {
            index,
            model: model.into(),
        });
    }
    Ok(())
}

/// Weighted choice with `r` uniform in `[0, 1)`; equal weights when none are set.
fn choose(targets: &[TargetModel], r: f64) -> Option<&TargetModel> {
    let total: u64 = targets
        .iter()
        .map(|t| u64::from(t.weight.unwrap_or(1)))
        .sum();
    if total == 0 {
        return None;
    }
    let mut x = (r.clamp(0.0, 0.999_999_999) * total as f64) as u64;
    for t in targets {
        let w = u64::from(t.weight.unwrap_or(1));
        if x < w {
            return Some(t);
        }
        x -= w;
    }
    targets.last()
}

impl ModelRules {
    /// Builds and checks a rule set.
    pub fn new(
        models: Vec<ModelRule>,
        objectives: Vec<Objective>,
        rewrites: Vec<RewriteRule>,
        unknown_model: UnknownModelPolicy,
    ) -> Result<Self, RuleError> {
        let mut map = HashMap::new();
        for (i, m) in models.into_iter().enumerate() {
            check_targets(i, &m.model_name, &m.target_models)?;
            if map.contains_key(&m.model_name) {
                return Err(RuleError::Duplicate(m.model_name));
            }
            map.insert(m.model_name.clone(), m);
        }
        for (i, r) in rewrites.iter().enumerate() {
            check_targets(i, &r.matches.join(","), &r.targets)?;
        }
        Ok(Self {
            models: map,
            objectives: objectives
                .into_iter()
                .map(|o| (o.name.clone(), o))
                .collect(),
            rewrites,
            unknown_model,
        })
    }

    /// Builds a rule set from objects that any namespace user may create: each model rule
    /// that is invalid, or names a model an earlier rule already names, is left out and
    /// returned with its index, while the rest stay in force. Callers order the rules oldest
    /// first, so the oldest object wins a conflict (as upstream). Invalid rewrite rules are
    /// left out the same way (their indexes are offset by `models.len()`).
    pub fn lenient(
        models: Vec<ModelRule>,
        objectives: Vec<Objective>,
        rewrites: Vec<RewriteRule>,
        unknown_model: UnknownModelPolicy,
    ) -> (Self, Vec<(usize, RuleError)>) {
        let mut rejected = Vec::new();
        let mut map: HashMap<String, ModelRule> = HashMap::new();
        let n = models.len();
        for (i, m) in models.into_iter().enumerate() {
            if let Err(e) = check_targets(i, &m.model_name, &m.target_models) {
                rejected.push((i, e));
                continue;
            }
            if map.contains_key(&m.model_name) {
                rejected.push((i, RuleError::Duplicate(m.model_name)));
                continue;
            }
            map.insert(m.model_name.clone(), m);
        }
        let mut kept = Vec::with_capacity(rewrites.len());
        for (i, r) in rewrites.into_iter().enumerate() {
            match check_targets(i, &r.matches.join(","), &r.targets) {
                Ok(()) => kept.push(r),
                Err(e) => rejected.push((n + i, e)),
            }
        }
        let rules = Self {
            models: map,
            objectives: objectives
                .into_iter()
                .map(|o| (o.name.clone(), o))
                .collect(),
            rewrites: kept,
            unknown_model,
        };
        (rules, rejected)
    }

    /// Whether a rule (InferenceModel or rewrite) names `model`.
    pub fn knows(&self, model: &str) -> bool {
        self.models.contains_key(model)
            || self
                .rewrites
                .iter()
                .any(|w| w.matches.iter().any(|m| m == model))
    }

    /// The weighted targets of the rule for `model` (for operators' views), if one names it.
    pub fn targets_of(&self, model: &str) -> Option<Vec<(String, Option<u32>)>> {
        self.models.get(model).map(|m| {
            m.target_models
                .iter()
                .map(|t| (t.name.clone(), t.weight))
                .collect()
        })
    }

    /// Whether a rule sends requests to `model` (a target of an InferenceModel or rewrite).
    pub fn targets(&self, model: &str) -> bool {
        self.models
            .values()
            .any(|m| m.target_models.iter().any(|t| t.name == model))
            || self
                .rewrites
                .iter()
                .any(|w| w.targets.iter().any(|t| t.name == model))
    }

    /// Model names clients may send (for logs and metrics).
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// Resolves a request's target model and priority. `r` is uniform in `[0,1)`.
    pub fn resolve(
        &self,
        model: &str,
        objective: Option<&str>,
        header_rewrite: Option<&str>,
        r: f64,
    ) -> Result<Resolved, RuleError> {
        let rule = self.models.get(model);
        let rewrite = self
            .rewrites
            .iter()
            .find(|w| w.matches.iter().any(|m| m == model));
        if rule.is_none() && rewrite.is_none() && self.unknown_model == UnknownModelPolicy::Reject {
            return Err(RuleError::UnknownModel(model.into()));
        }
        let mut priority = rule
            .and_then(|m| m.criticality)
            .unwrap_or_default()
            .priority();
        let mut objective_name = None;
        if let Some(name) = objective.filter(|o| !o.is_empty()) {
            match self.objectives.get(name) {
                Some(o) => {
                    priority = o.priority;
                    objective_name = Some(o.name.clone());
                }
                None => return Err(RuleError::UnknownObjective(name.into())),
            }
        }
        let target = if let Some(h) = header_rewrite.filter(|h| !h.is_empty()) {
            h.to_string()
        } else if let Some(t) = rewrite.and_then(|w| choose(&w.targets, r)) {
            t.name.clone()
        } else if let Some(t) = rule.and_then(|m| choose(&m.target_models, r)) {
            t.name.clone()
        } else {
            model.to_string()
        };
        Ok(Resolved {
            requested: model.to_string(),
            target,
            priority,
            objective: objective_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_keeps_the_first_of_a_conflict_and_the_rest() {
        let m = |name: &str, targets: Vec<TargetModel>| ModelRule {
            model_name: name.into(),
            criticality: None,
            target_models: targets,
        };
        let (rules, rejected) = ModelRules::lenient(
            vec![
                m("a", vec![t("a-1", None)]),
                m("a", vec![t("a-2", None)]),
                m("b", vec![t("b-1", Some(1)), t("b-2", None)]),
                m("c", vec![]),
            ],
            vec![],
            vec![],
            UnknownModelPolicy::Route,
        );
        let mut names: Vec<&str> = rules.model_names().collect();
        names.sort_unstable();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(rules.resolve("a", None, None, 0.5).unwrap().target, "a-1");
        assert_eq!(rejected.len(), 2);
        assert_eq!(rejected[0], (1, RuleError::Duplicate("a".into())));
        assert!(matches!(rejected[1], (2, RuleError::MixedWeights { .. })));
    }

    fn t(name: &str, w: Option<u32>) -> TargetModel {
        TargetModel {
            name: name.into(),
            weight: w,
        }
    }

    fn rules() -> ModelRules {
        ModelRules::new(
            vec![
                ModelRule {
                    model_name: "food-review".into(),
                    criticality: Some(Criticality::Standard),
                    target_models: vec![t("food-review-1", Some(90)), t("food-review-2", Some(10))],
                },
                ModelRule {
                    model_name: "batch".into(),
                    criticality: Some(Criticality::Sheddable),
                    target_models: vec![],
                },
            ],
            vec![Objective {
                name: "premium".into(),
                priority: 10,
            }],
            vec![RewriteRule {
                matches: vec!["llama".into()],
                targets: vec![t("meta-llama/Llama-3.1-8B-Instruct", None)],
            }],
            UnknownModelPolicy::Route,
        )
        .unwrap()
    }

    #[test]
    fn weighted_split_is_exact_over_the_unit_interval() {
        let r = rules();
        let n = 1000;
        let ones = (0..n)
            .filter(|i| {
                r.resolve("food-review", None, None, *i as f64 / n as f64)
                    .unwrap()
                    .target
                    == "food-review-1"
            })
            .count();
        assert_eq!(ones, 900);
    }

    #[test]
    fn priority_objective_rewrite_and_unknown() {
        let r = rules();
        let x = r.resolve("batch", None, None, 0.5).unwrap();
        assert!(x.sheddable());
        assert_eq!(x.target, "batch");
        let x = r.resolve("batch", Some("premium"), None, 0.5).unwrap();
        assert_eq!(x.priority, 10);
        assert!(!x.sheddable());
        assert_eq!(
            r.resolve("x", Some("nope"), None, 0.5),
            Err(RuleError::UnknownObjective("nope".into()))
        );
        let x = r.resolve("llama", None, None, 0.3).unwrap();
        assert_eq!(x.target, "meta-llama/Llama-3.1-8B-Instruct");
        assert!(x.rewritten());
        let x = r
            .resolve("food-review", None, Some("food-review-3"), 0.0)
            .unwrap();
        assert_eq!(x.target, "food-review-3");
        let x = r.resolve("other", None, None, 0.0).unwrap();
        assert_eq!((x.target.as_str(), x.priority), ("other", 0));
        let mut strict = rules();
        strict.unknown_model = UnknownModelPolicy::Reject;
        assert_eq!(
            strict.resolve("other", None, None, 0.0),
            Err(RuleError::UnknownModel("other".into()))
        );
    }

    #[test]
    fn invalid_rule_sets() {
        let mixed = ModelRule {
            model_name: "m".into(),
            criticality: None,
            target_models: vec![t("a", Some(1)), t("b", None)],
        };
        assert!(matches!(
            ModelRules::new(vec![mixed], vec![], vec![], UnknownModelPolicy::Route),
            Err(RuleError::MixedWeights { .. })
        ));
        let dup = ModelRule {
            model_name: "m".into(),
            criticality: None,
            target_models: vec![],
        };
        assert!(matches!(
            ModelRules::new(
                vec![dup.clone(), dup],
                vec![],
                vec![],
                UnknownModelPolicy::Route
            ),
            Err(RuleError::Duplicate(_))
        ));
    }
}

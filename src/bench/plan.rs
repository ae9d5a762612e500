//! A workload's seeded request plan at a rate: Poisson arrivals, the traffic mix, prompts and conversations, as JSON bodies ready to send.

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Zipf};
use serde_json::json;
use std::collections::HashMap;

use super::workload::{BASE_MODEL, Traffic, Workload};

/// One request of a plan.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Seconds after the run starts.
    pub at: f64,
    /// `/v1/completions` or `/v1/chat/completions`.
    pub path: &'static str,
    /// Traffic class (criticality for mixed workloads, else `all`).
    pub class: String,
    pub model: String,
    pub body: String,
    pub max_tokens: u32,
    /// `x-gateway-inference-fairness-id` to send, if any.
    pub fairness_id: Option<String>,
    /// The prompt family it belongs to (a prefix-heavy tenant), for per-group analysis of
    /// requests.csv; empty elsewhere.
    pub group: String,
}

/// Text of `tokens` simulated tokens (vllm-sim counts 4 characters as one token).
fn words(rng: &mut SmallRng, tokens: u32) -> String {
    let mut s = String::with_capacity(tokens as usize * 4);
    for _ in 0..tokens {
        for _ in 0..3 {
            s.push(rng.random_range(b'a'..=b'z') as char);
        }
        s.push(' ');
    }
    s
}

fn completion(model: &str, prompt: String, max_tokens: u32) -> String {
    json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

fn chat(model: &str, messages: serde_json::Value, max_tokens: u32) -> String {
    json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// Which adapter holds each popularity rank: the identity, or a seeded permutation drawn
/// anew every `rotate_every_s` (the popularity shift).
struct Popularity {
    n: usize,
    seed: u64,
    every: Option<f64>,
    epoch: Option<u64>,
    perm: Vec<usize>,
}

impl Popularity {
    fn new(n: usize, seed: u64, every: Option<f64>) -> Self {
        Self {
            n,
            seed,
            every,
            epoch: None,
            perm: (0..n).collect(),
        }
    }

    fn adapter(&mut self, rank: usize, at: f64) -> usize {
        let Some(every) = self.every else {
            return rank;
        };
        let epoch = (at / every).floor().max(0.0) as u64;
        if self.epoch != Some(epoch) {
            self.epoch = Some(epoch);
            self.perm = (0..self.n).collect();
            if epoch > 0 {
                let mut r = SmallRng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9e37_79b9));
                self.perm.shuffle(&mut r);
            }
        }
        self.perm[rank]
    }
}

/// Generates the requests of one run at `rate` requests per second: Poisson arrivals over
/// `duration_s`, contents drawn from the workload with its seed (the same for every policy).
pub fn plan(w: &Workload, rate: f64) -> Vec<Planned> {
    let mut rng = SmallRng::seed_from_u64(w.seed ^ rate.to_bits());
    let gaps = Exp::new(rate).expect("validated rate");
    let mut times = Vec::new();
    let mut t = gaps.sample(&mut rng);
    // Bounded: never more than twice the expected count.
    let cap = (rate * w.duration_s * 2.0).ceil() as usize + 1;
    while t < w.duration_s && times.len() < cap {
        times.push(t);
        t += gaps.sample(&mut rng);
    }
    match &w.traffic {
        Traffic::MultiLora {
            adapters,
            zipf_exponent,
            prompt,
            output,
            flash_crowd,
            rotate_every_s,
            ..
        } => {
            let names = w.adapters();
            let zipf = Zipf::new(*adapters as f64, *zipf_exponent).expect("validated");
            let mut popularity = Popularity::new(*adapters, w.seed, *rotate_every_s);
            // The crowd goes to an adapter from the least popular tenth (never the coldest
            // by construction of the ranks alone: a seeded pick).
            let crowd = flash_crowd.map(|f| {
                let tail = (*adapters / 10).max(1);
                let k = *adapters - 1 - (w.seed as usize % tail);
                (f, k)
            });
            times
                .into_iter()
                .map(|at| {
                    let rank = (zipf.sample(&mut rng) as usize).clamp(1, *adapters) - 1;
                    let mut k = popularity.adapter(rank, at);
                    if let Some((f, ck)) = crowd
                        && at >= f.at_s
                        && rng.random_bool(f.share)
                    {
                        k = ck;
                    }
                    let a = &names[k];
                    let p = prompt.sample(&mut rng);
                    let o = output.sample(&mut rng);
                    Planned {
                        at,
                        path: "/v1/completions",
                        class: "all".into(),
                        model: a.clone(),
                        body: completion(a, words(&mut rng, p), o),
                        max_tokens: o,
                        fairness_id: None,
                        group: String::new(),
                    }
                })
                .collect()
        }
        Traffic::PrefixHeavy {
            tenants,
            system_prompt_tokens,
            conversations_per_tenant,
            turns,
            user,
            assistant,
            output,
        } => {
            let mut prng = SmallRng::seed_from_u64(w.seed);
            let systems: Vec<String> = (0..*tenants)
                .map(|t| {
                    format!(
                        "You are the assistant of tenant {t}. {}",
                        words(&mut prng, *system_prompt_tokens)
                    )
                })
                .collect();
            // (tenant, conversation) -> history so far.
            let mut convs: HashMap<(usize, usize), Vec<serde_json::Value>> = HashMap::new();
            // The first arrivals visit every tenant once (in a seeded order), so a warm-up
            // long enough for `tenants` arrivals leaves no first-seen tenant in the figures.
            let mut first: Vec<usize> = (0..*tenants).collect();
            first.shuffle(&mut rng);
            times
                .into_iter()
                .enumerate()
                .map(|(n, at)| {
                    let t = first
                        .get(n)
                        .copied()
                        .unwrap_or_else(|| rng.random_range(0..*tenants));
                    let c = rng.random_range(0..*conversations_per_tenant);
                    let hist = convs.entry((t, c)).or_default();
                    if hist.len() as u32 > 2 * (turns - 1) {
                        hist.clear();
                    }
                    if !hist.is_empty() {
                        let a = assistant.sample(&mut rng);
                        hist.push(json!({"role": "assistant", "content": words(&mut rng, a)}));
                    }
                    let u = user.sample(&mut rng);
                    hist.push(json!({"role": "user", "content": words(&mut rng, u)}));
                    let mut messages = vec![json!({"role": "system", "content": systems[t]})];
                    messages.extend(hist.iter().cloned());
                    let o = output.sample(&mut rng);
                    Planned {
                        at,
                        path: "/v1/chat/completions",
                        class: "all".into(),
                        model: BASE_MODEL.into(),
                        body: chat(BASE_MODEL, serde_json::Value::Array(messages), o),
                        max_tokens: o,
                        fairness_id: None,
                        group: format!("tenant-{t}"),
                    }
                })
                .collect()
        }
        Traffic::Classes { classes } => {
            let total: f64 = classes.iter().map(|c| c.share).sum();
            times
                .into_iter()
                .map(|at| {
                    let mut x = rng.random::<f64>() * total;
                    let mut pick = &classes[classes.len() - 1];
                    for c in classes {
                        if x < c.share {
                            pick = c;
                            break;
                        }
                        x -= c.share;
                    }
                    let p = pick.prompt.sample(&mut rng);
                    let o = pick.output.sample(&mut rng);
                    Planned {
                        at,
                        path: "/v1/completions",
                        class: pick
                            .name
                            .clone()
                            .unwrap_or_else(|| pick.criticality.clone()),
                        model: pick.model.clone(),
                        body: completion(&pick.model, words(&mut rng, p), o),
                        max_tokens: o,
                        fairness_id: pick.fairness_id.clone(),
                        group: String::new(),
                    }
                })
                .collect()
        }
        Traffic::Sharegpt { prompt, output } => times
            .into_iter()
            .map(|at| {
                let p = prompt.sample(&mut rng);
                let o = output.sample(&mut rng);
                Planned {
                    at,
                    path: "/v1/chat/completions",
                    class: "all".into(),
                    model: BASE_MODEL.into(),
                    body: chat(
                        BASE_MODEL,
                        json!([{"role": "user", "content": words(&mut rng, p)}]),
                        o,
                    ),
                    max_tokens: o,
                    fairness_id: None,
                    group: String::new(),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::workload::tests::LORA;

    #[test]
    fn plans_are_seeded_poisson_and_zipf() {
        let w = Workload::parse(LORA).unwrap();
        let a = plan(&w, 10.0);
        let b = plan(&w, 10.0);
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.body == y.body && x.at == y.at)
        );
        // ~200 arrivals expected; Poisson sd ~14.
        assert!((140..260).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|p| p[0].at <= p[1].at));
        let top = a.iter().filter(|p| p.model == "adapter-01").count();
        let last = a.iter().filter(|p| p.model == "adapter-20").count();
        assert!(top > 4 * last.max(1), "zipf: top {top}, last {last}");
        assert!(a.iter().all(|p| p.max_tokens == 20));
        let v: serde_json::Value = serde_json::from_str(&a[0].body).unwrap();
        assert_eq!(v["stream"], true);
    }

    #[test]
    fn prefix_heavy_conversations_share_their_tenant_prompt() {
        let w = Workload::parse("name: p\nseed: 1\nfleet: {max_num_seqs: 4}\nduration_s: 10\nrates: [20]\ntraffic:\n  kind: prefix-heavy\n  tenants: 3\n  system_prompt_tokens: 50\n  conversations_per_tenant: 2\n  turns: 3\n  user: {median: 10}\n  assistant: {median: 10}\n  output: {median: 5}\n").unwrap();
        let p = plan(&w, 20.0);
        let sys = |b: &str| -> String {
            let v: serde_json::Value = serde_json::from_str(b).unwrap();
            v["messages"][0]["content"].as_str().unwrap().to_string()
        };
        let distinct: std::collections::HashSet<String> = p.iter().map(|x| sys(&x.body)).collect();
        assert_eq!(distinct.len(), 3);
        let firsts: std::collections::HashSet<String> =
            p[..3].iter().map(|x| sys(&x.body)).collect();
        assert_eq!(firsts.len(), 3, "the first arrivals visit every tenant");
        let longest = p
            .iter()
            .map(|x| {
                let v: serde_json::Value = serde_json::from_str(&x.body).unwrap();
                v["messages"].as_array().unwrap().len()
            })
            .max()
            .unwrap();
        assert_eq!(
            longest,
            1 + 2 * 3 - 1,
            "system + 3 user + 2 assistant turns"
        );
    }
}

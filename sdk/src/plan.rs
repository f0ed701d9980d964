//! What strategies return: a layer map (output block `j` is a copy of input block `from`) plus edits.
//! Plans compose, validate, print as a dry run, and are written once by the host.
//!
//! How plans compose: the host runs a recipe's strategies in order. The first one plans against the input
//! model; each later one sees the model the plans so far make (its layer count and weights, through the layer
//! map) and indexes *that* model's blocks. The host joins them with [`Plan::then`], so output block `j` of the
//! whole recipe comes from input block `first.layers[second.layers[j].from].from`, with both plans' edits, and
//! writes the model once at the end.

use crate::Result;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// A strategy's answer: which input block each output block copies, plus parts to re-initialise and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Output block `j` comes from input block `layers[j].from`.
    pub layers: Vec<LayerSource>,
    /// Parts to initialise afresh instead of inheriting, by role: `final_norm`, `position_embedding`, or
    /// `all` (every tensor, as transformers initialises a new model: the "same size from scratch" baseline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reinit: Vec<String>,
    /// Seeds the fresh initialisation of `reinit`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seed: u64,
    /// Why: the rule applied and its evidence. Shown by `--dry-run`, kept in the output's record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Where one output block comes from: a copy of input block `from`, with `edits` applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSource {
    pub from: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edits: Vec<Edit>,
}

/// A change applied to one copied block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Edit {
    /// Zero the block's output projections (attention output and MLP down-projection), so the block
    /// adds nothing to the residual stream at first: the model's function is unchanged (LLaMA Pro).
    ZeroOutput,
}

/// The most blocks a plan may produce. The deepest published decoders have a few hundred; a plan
/// past this is a typo, and would allocate and print without end.
pub const MAX_LAYERS: usize = 4096;

/// Refuses an output depth past [`MAX_LAYERS`] before anything of that size is built.
pub fn check_depth(layers: usize) -> Result<()> {
    crate::ensure!(
        layers <= MAX_LAYERS,
        "the plan would make a model of {layers} layers; scalpel refuses more than {MAX_LAYERS} (check the repeat counts)"
    );
    Ok(())
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Plan {
    /// Every block kept, in order.
    pub fn identity(layers: usize) -> Self {
        Self::ranges(&[0..layers])
    }

    /// The blocks of each half-open range, concatenated (mergekit's `passthrough` slices).
    pub fn ranges(ranges: &[Range<usize>]) -> Self {
        let layers = ranges.iter().flat_map(|r| r.clone()).map(|from| LayerSource { from, edits: vec![] }).collect();
        Plan { layers, ..Self::default() }
    }

    /// Every block of a model of `layers` but those in `removed`, in order: what a pruning strategy returns.
    /// A block the model does not have is an error, not skipped (a typo must not leave the model whole).
    pub fn without(layers: usize, removed: &[usize]) -> Result<Self> {
        if let Some(&bad) = removed.iter().find(|&&l| l >= layers) {
            crate::bail!("layer {bad} does not exist: the model has layers 0..{layers}");
        }
        let mut runs: Vec<Range<usize>> = Vec::new();
        for l in (0..layers).filter(|l| !removed.contains(l)) {
            match runs.last_mut() {
                Some(run) if run.end == l => run.end += 1,
                _ => runs.push(l..l + 1),
            }
        }
        Ok(Self::ranges(&runs))
    }

    /// The plan with a note on why added (shown by `--dry-run`, kept in the output's record).
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    /// The source block of each output block.
    pub fn sources(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.from).collect()
    }

    /// `next` applied to the output of `self`: `next`'s indices refer to `self`'s output blocks.
    ///
    /// Edits follow their block (a block zeroed by either plan stays zeroed), re-initialised parts add up, and
    /// the notes of both are kept in order.
    pub fn then(&self, next: &Plan) -> Result<Plan> {
        next.validate(self.layers.len())?;
        let layers = next
            .layers
            .iter()
            .map(|l| {
                let inner = &self.layers[l.from];
                let mut edits = inner.edits.clone();
                for e in &l.edits {
                    if !edits.contains(e) {
                        edits.push(*e);
                    }
                }
                LayerSource { from: inner.from, edits }
            })
            .collect();
        let mut reinit = self.reinit.clone();
        reinit.extend(next.reinit.iter().filter(|r| !self.reinit.contains(r)).cloned());
        let notes = self.notes.iter().chain(&next.notes).cloned().collect();
        Ok(Plan { layers, reinit, seed: if next.reinit.is_empty() { self.seed } else { next.seed }, notes })
    }

    /// At least one block, every source inside a model of `input_layers` blocks.
    pub fn validate(&self, input_layers: usize) -> Result<()> {
        crate::ensure!(!self.layers.is_empty(), "the plan keeps no layer: a model needs at least one");
        check_depth(self.layers.len())?;
        if let Some((j, l)) = self.layers.iter().enumerate().find(|(_, l)| l.from >= input_layers) {
            crate::bail!("output layer {j} would come from layer {}, but the model has layers 0..{input_layers}", l.from);
        }
        const ROLES: [&str; 3] = ["final_norm", "position_embedding", "all"];
        if let Some(r) = self.reinit.iter().find(|r| !ROLES.contains(&r.as_str())) {
            crate::bail!("cannot re-initialise `{r}`: known parts are {}", ROLES.join(", "));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_concatenate_half_open_slices() {
        assert_eq!(Plan::ranges(&[0..3, 1..3]).sources(), vec![0, 1, 2, 1, 2]);
    }

    #[test]
    fn without_keeps_every_other_block_in_runs_and_refuses_a_missing_one() {
        let plan = Plan::without(6, &[4, 1, 4]).unwrap();
        assert_eq!(plan.sources(), [0, 2, 3, 5]);
        assert_eq!(plan, Plan::ranges(&[0..1, 2..4, 5..6]));
        let e = Plan::without(6, &[2, 6]).unwrap_err().to_string();
        assert!(e.contains("layer 6 does not exist: the model has layers 0..6"), "{e}");
    }

    #[test]
    fn composition_maps_through_the_first_plan() {
        let stack = Plan::ranges(&[0..2, 0..2]); // 0 1 0 1
        let cut = Plan::ranges(&[1..4]); // of those: 1 0 1
        assert_eq!(stack.then(&cut).unwrap().sources(), vec![1, 0, 1]);
    }

    #[test]
    fn edits_follow_their_block_through_composition() {
        let mut grow = Plan::ranges(&[0..2, 1..2]);
        grow.layers[2].edits.push(Edit::ZeroOutput);
        let keep = Plan::ranges(&[1..3]);
        let both = grow.then(&keep).unwrap();
        assert_eq!(both.layers[1], LayerSource { from: 1, edits: vec![Edit::ZeroOutput] });
        assert!(both.layers[0].edits.is_empty());
    }

    #[test]
    fn validation_names_the_bad_index() {
        let err = Plan::ranges(&[0..5]).validate(4).unwrap_err().to_string();
        assert!(err.contains("output layer 4 would come from layer 4"), "{err}");
        assert!(Plan::ranges(&[]).validate(4).unwrap_err().to_string().contains("no layer"));
        let mut p = Plan::identity(2);
        p.reinit.push("lm_head".into());
        assert!(p.validate(2).unwrap_err().to_string().contains("lm_head"));
    }

    #[test]
    fn an_absurd_depth_is_refused_with_the_limit() {
        assert!(Plan::ranges(&vec![0..4; MAX_LAYERS / 4]).validate(4).is_ok());
        let e = Plan::ranges(&vec![0..4; MAX_LAYERS / 4 + 1]).validate(4).unwrap_err().to_string();
        assert!(e.contains("4100 layers") && e.contains("4096"), "{e}");
        assert!(check_depth(usize::MAX).is_err());
    }

    #[test]
    fn composing_with_an_out_of_range_plan_fails() {
        assert!(Plan::identity(2).then(&Plan::ranges(&[0..3])).is_err());
    }
}

//! Recipe TOML (`Recipe::parse`, what `scalpel run` reads): steps, training settings checked against
//! a model's sizes, Inheritune settings, and `--print-recipe`, whose output must read back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scalpel::model::checkpoint::Dims;
use scalpel::recipe::{Recipe, StepKind};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("/fuzz/recipe.toml");
    let Ok(recipe) = Recipe::parse(text, path) else { return };
    let dims = Dims { layers: 4, heads: 4, kv_heads: 2, d_model: 32, head_dim: 8, vocab: 100, context: 64, intermediate: 64 };
    for step in &recipe.steps {
        if let Ok(StepKind::Train(t)) = step.kind() {
            if t.check(&dims).is_ok() {
                for s in [0, t.warmup, t.steps / 2, t.steps.saturating_sub(1)] {
                    assert!(t.lr_at(s).is_finite(), "learning rate of step {s} is not finite");
                }
            }
        }
    }
    let _ = scalpel::inheritune::Settings::from_recipe(&recipe);
    let printed = recipe.to_toml().expect("a parsed recipe prints");
    let again = Recipe::parse(&printed, path).unwrap_or_else(|e| panic!("--print-recipe wrote a recipe scalpel refuses: {e:#}\n{printed}"));
    assert_eq!(again.to_toml().unwrap(), printed, "--print-recipe does not read back the same");
});

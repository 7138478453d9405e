//! Analysis patterns are data: which stages run, and the prompt templates of the
//! `meta` and `synthesis` stages. Built in, and overridable or extendable from the
//! configuration file (`[patterns.<name>]`). Templates use `$original_prompt`,
//! `$own_response` and `$other_responses` (meta) and `$responses` (synthesis).

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

use crate::domain::Stage;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternSpec {
    #[serde(default)]
    pub description: String,
    /// Each model revises its answer in view of the others'; absent: one stage only.
    #[serde(default)]
    pub meta_template: Option<String>,
    /// One model writes the final answer from the others'; absent: no synthesis.
    #[serde(default)]
    pub synthesis_template: Option<String>,
}

impl PatternSpec {
    pub fn stages(&self) -> Vec<Stage> {
        let mut stages = vec![Stage::Initial];
        if self.meta_template.is_some() {
            stages.push(Stage::Meta);
        }
        if self.synthesis_template.is_some() {
            stages.push(Stage::Synthesis);
        }
        stages
    }

    /// Provider calls for `models` models, at most: every model in the first stages,
    /// one in synthesis.
    pub fn calls(&self, models: usize) -> usize {
        let per_model = 1 + usize::from(self.meta_template.is_some());
        models * per_model + usize::from(self.synthesis_template.is_some())
    }
}

/// Fills a template. Unknown `$names` are left as written.
pub fn render(template: &str, values: &[(&str, &str)]) -> String {
    // Longest names first, so `$own_response` is not taken for a shorter name.
    let mut values = values.to_vec();
    values.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = template.to_owned();
    for (name, value) in values {
        out = out.replace(&format!("${name}"), value);
    }
    out
}

const META_INTRO: &str = "Original question:\n$original_prompt\n\nYour earlier answer:\n$own_response\n\nOther models answered:\n$other_responses\n\n";
const SYNTHESIS_INTRO: &str = "Original question:\n$original_prompt\n\nThe models' answers:\n$responses\n\n";

#[derive(Debug, Clone)]
pub struct Patterns(BTreeMap<String, PatternSpec>);

impl Patterns {
    pub fn builtin() -> Self {
        let multi = |description: &str, meta: &str, synthesis: &str| PatternSpec {
            description: description.to_owned(),
            meta_template: Some(format!("{META_INTRO}{meta}")),
            synthesis_template: Some(format!("{SYNTHESIS_INTRO}{synthesis}")),
        };
        Self(BTreeMap::from([
            (
                "direct".to_owned(),
                PatternSpec {
                    description: "Every model answers the prompt once.".to_owned(),
                    meta_template: None,
                    synthesis_template: None,
                },
            ),
            ("gut".to_owned(), multi(
                "Quick reactions, revised once, combined.",
                "Give your revised answer in a few sentences, trusting your first instinct where the others disagree.",
                "Write the answer most of them would stand behind, briefly.",
            )),
            ("confidence".to_owned(), multi(
                "Answers with stated confidence, reconciled by confidence.",
                "Revise your answer and state your confidence (0-100%) in each claim.",
                "Combine the answers, weighing each claim by the confidence given and noting where confidence was low.",
            )),
            ("critique".to_owned(), multi(
                "Each model critiques the others, then a synthesis.",
                "Critique the other answers: what is wrong, missing or weak? Then give your improved answer.",
                "Write the best final answer, using the critiques to avoid the mistakes they found.",
            )),
            ("fact_check".to_owned(), multi(
                "Claims are checked against each other before a final answer.",
                "List the factual claims in all answers, mark each as supported, doubtful or wrong, and correct your answer.",
                "Write the final answer using only the claims that survived the checks; say what remains uncertain.",
            )),
            ("perspective".to_owned(), multi(
                "Different viewpoints are compared and kept distinct.",
                "Which perspectives do the other answers take that yours does not? Revise your answer to name your perspective.",
                "Present the main perspectives side by side, then what they agree on.",
            )),
            ("scenario".to_owned(), multi(
                "Possible outcomes explored and weighed.",
                "Add the scenarios the others missed and estimate how likely each is.",
                "Lay out the scenarios from most to least likely, with what would signal each.",
            )),
        ]))
    }

    /// The built-in patterns, with those the file defines replaced or added.
    pub fn load(file: Option<&Path>) -> Result<Self, String> {
        let mut patterns = Self::builtin();
        let Some(path) = file else { return Ok(patterns) };
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            patterns: BTreeMap<String, PatternSpec>,
        }
        let file: File = crate::config::read_file(path)?;
        patterns.0.extend(file.patterns);
        Ok(patterns)
    }

    pub fn get(&self, name: &str) -> Option<&PatternSpec> {
        self.0.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &PatternSpec)> {
        self.0.iter().map(|(name, spec)| (name.as_str(), spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_their_placeholders() {
        let out = render(
            "Q: $original_prompt / mine: $own_response / theirs: $other_responses",
            &[("original_prompt", "why?"), ("own_response", "because"), ("other_responses", "- beta: since")],
        );
        assert_eq!(out, "Q: why? / mine: because / theirs: - beta: since");
    }

    #[test]
    fn builtin_patterns_and_their_calls() {
        let patterns = Patterns::builtin();
        for name in ["direct", "gut", "confidence", "critique", "fact_check", "perspective", "scenario"] {
            assert!(patterns.get(name).is_some(), "{name}");
        }
        assert_eq!(patterns.get("direct").map(|p| p.calls(3)), Some(3));
        assert_eq!(patterns.get("critique").map(|p| p.calls(3)), Some(7));
        assert_eq!(
            patterns.get("critique").map(PatternSpec::stages),
            Some(vec![Stage::Initial, Stage::Meta, Stage::Synthesis])
        );
    }
}

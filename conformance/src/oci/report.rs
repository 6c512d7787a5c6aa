//! The results of a run: one [`TestResult`] per test in the official order, as a table or JSON.

use std::collections::BTreeSet;
use std::fmt::Write;

use serde::Serialize;

/// How one test ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    /// What was expected and what came back.
    Fail(String),
    /// Why the test did not run.
    Skip(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// `Workflow/Context/Title`, the official suite's names joined by `/`.
    pub name: String,
    pub outcome: Outcome,
    /// A passing test's caveat, where the official suite prints a warning.
    pub warning: Option<String>,
}

impl TestResult {
    pub fn new(name: impl Into<String>, outcome: Outcome) -> TestResult {
        TestResult { name: name.into(), outcome, warning: None }
    }
}

/// Counts by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub results: Vec<TestResult>,
}

impl Report {
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for r in &self.results {
            match r.outcome {
                Outcome::Pass => t.passed += 1,
                Outcome::Fail(_) => t.failed += 1,
                Outcome::Skip(_) => t.skipped += 1,
            }
        }
        t
    }

    /// True when no test failed (skips are fine).
    pub fn success(&self) -> bool {
        self.totals().failed == 0
    }

    /// Names that passed every time they ran. A few official names occur twice; a name with one
    /// failed run is in [`Report::failed`] only.
    pub fn passed(&self) -> BTreeSet<String> {
        let failed = self.failed();
        self.names(|o| matches!(o, Outcome::Pass)).into_iter().filter(|n| !failed.contains(n)).collect()
    }

    /// Names that failed at least once.
    pub fn failed(&self) -> BTreeSet<String> {
        self.names(|o| matches!(o, Outcome::Fail(_)))
    }

    /// Names that never ran.
    pub fn skipped(&self) -> BTreeSet<String> {
        let ran: BTreeSet<String> = self.names(|o| !matches!(o, Outcome::Skip(_)));
        self.names(|o| matches!(o, Outcome::Skip(_))).into_iter().filter(|n| !ran.contains(n)).collect()
    }

    fn names(&self, keep: impl Fn(&Outcome) -> bool) -> BTreeSet<String> {
        self.results.iter().filter(|r| keep(&r.outcome)).map(|r| r.name.clone()).collect()
    }

    /// One row per test (`PASS`, `FAIL` or `SKIP`, then the name), reasons indented below
    /// failures, skips and warnings, then the totals.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for r in &self.results {
            let (label, note) = match &r.outcome {
                Outcome::Pass => ("PASS", r.warning.as_deref().map(|w| format!("warning: {w}"))),
                Outcome::Fail(why) => ("FAIL", Some(why.clone())),
                Outcome::Skip(why) => ("SKIP", Some(why.clone())),
            };
            let _ = writeln!(out, "{label}  {}", r.name);
            if let Some(note) = note {
                let _ = writeln!(out, "        {note}");
            }
        }
        let t = self.totals();
        let _ = writeln!(
            out,
            "{} tests: {} passed, {} failed, {} skipped",
            self.results.len(),
            t.passed,
            t.failed,
            t.skipped
        );
        out
    }

    /// `{"results":[{"name","outcome","message"?,"warning"?}],"totals":{…}}`.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Row<'a> {
            name: &'a str,
            outcome: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            message: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            warning: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Doc<'a> {
            results: Vec<Row<'a>>,
            totals: Totals,
        }
        let results = self
            .results
            .iter()
            .map(|r| {
                let (outcome, message) = match &r.outcome {
                    Outcome::Pass => ("pass", None),
                    Outcome::Fail(m) => ("fail", Some(m.as_str())),
                    Outcome::Skip(m) => ("skip", Some(m.as_str())),
                };
                Row { name: &r.name, outcome, message, warning: r.warning.as_deref() }
            })
            .collect();
        let doc = Doc { results, totals: self.totals() };
        serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let r = |n: &str, o| TestResult::new(n, o);
        Report {
            results: vec![
                r("Pull/Setup/Populate registry with test blob", Outcome::Pass),
                r(
                    "Pull/Setup/Populate registry with test blob",
                    Outcome::Fail("expected 201, got 500".into()),
                ),
                r("Pull/Pull blobs/GET nonexistent blob should result in 404 response", Outcome::Pass),
                r("Push/Setup/Something", Outcome::Skip("the Push workflow is not enabled".into())),
            ],
        }
    }

    #[test]
    fn duplicate_names_count_as_failed_if_any_run_failed() {
        let rep = report();
        assert_eq!(rep.totals(), Totals { passed: 2, failed: 1, skipped: 1 });
        assert!(!rep.success());
        assert_eq!(
            rep.failed().into_iter().collect::<Vec<_>>(),
            ["Pull/Setup/Populate registry with test blob"]
        );
        assert_eq!(rep.passed().len(), 1);
        assert_eq!(rep.skipped().len(), 1);
    }

    #[test]
    fn the_table_has_a_row_per_test_and_totals() {
        let table = report().table();
        assert!(
            table
                .contains("FAIL  Pull/Setup/Populate registry with test blob\n        expected 201, got 500")
        );
        assert!(table.contains("SKIP  Push/Setup/Something"));
        assert!(table.ends_with("4 tests: 2 passed, 1 failed, 1 skipped\n"));
    }

    #[test]
    fn json_carries_outcomes_and_messages() {
        let v: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
        assert_eq!(v["results"][1]["outcome"], "fail");
        assert_eq!(v["results"][1]["message"], "expected 201, got 500");
        assert!(v["results"][0].get("message").is_none());
        assert_eq!(v["totals"]["failed"], 1);
    }
}

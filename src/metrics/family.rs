//! Metric families declared once. [`metric_families!`] takes each family's handle
//! field, Prometheus type, name, help, labels and buckets, and makes from that one
//! declaration the struct of handles that recording goes through, their registration,
//! and the family table in the struct's docs.

use prometheus::core::Collector;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use super::MetricsError;

/// One family as declared.
#[derive(Clone, Copy, Debug)]
pub struct FamilySpec {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    /// Histogram bucket bounds; empty for every other type.
    pub buckets: &'static [f64],
}

/// A Prometheus collector type a family can be declared as.
pub trait Family: Collector + Clone + Sized + 'static {
    /// Built from its spec; a spec whose labels or buckets do not fit the type is refused.
    fn build(spec: &FamilySpec) -> prometheus::Result<Self>;
}

/// Refuses a spec that does not fit its type: labels exactly when `labelled`, buckets
/// exactly when `bucketed`.
fn check(spec: &FamilySpec, labelled: bool, bucketed: bool) -> prometheus::Result<()> {
    if labelled != spec.labels.is_empty() && bucketed != spec.buckets.is_empty() {
        return Ok(());
    }
    let takes = |yes: bool, what: &str| {
        if yes {
            what.to_string()
        } else {
            format!("no {what}")
        }
    };
    Err(prometheus::Error::Msg(format!(
        "{}: declared with {} labels and {} buckets, but its type takes {} and {}",
        spec.name,
        spec.labels.len(),
        spec.buckets.len(),
        takes(labelled, "labels"),
        takes(bucketed, "buckets"),
    )))
}

fn opts(spec: &FamilySpec) -> Opts {
    Opts::new(spec.name, spec.help)
}

fn histogram_opts(spec: &FamilySpec) -> HistogramOpts {
    HistogramOpts::new(spec.name, spec.help).buckets(spec.buckets.to_vec())
}

/// Implements [`Family`] for a collector type: whether it takes labels and buckets, and
/// how it is built from a spec that fits.
macro_rules! family {
    ($ty:ident, labelled: $labelled:literal, bucketed: $bucketed:literal, $build:expr) => {
        impl Family for $ty {
            fn build(spec: &FamilySpec) -> prometheus::Result<Self> {
                check(spec, $labelled, $bucketed)?;
                $build(spec)
            }
        }
    };
}

family!(IntCounter, labelled: false, bucketed: false, |s| IntCounter::with_opts(opts(s)));
family!(IntGauge, labelled: false, bucketed: false, |s| IntGauge::with_opts(opts(s)));
family!(Histogram, labelled: false, bucketed: true, |s| Histogram::with_opts(
    histogram_opts(s)
));
family!(IntCounterVec, labelled: true, bucketed: false, |s: &FamilySpec| {
    IntCounterVec::new(opts(s), s.labels)
});
family!(IntGaugeVec, labelled: true, bucketed: false, |s: &FamilySpec| {
    IntGaugeVec::new(opts(s), s.labels)
});
family!(GaugeVec, labelled: true, bucketed: false, |s: &FamilySpec| {
    GaugeVec::new(opts(s), s.labels)
});
family!(HistogramVec, labelled: true, bucketed: true, |s: &FamilySpec| {
    HistogramVec::new(histogram_opts(s), s.labels)
});

/// Builds `spec`'s family as `F` and registers it in `registry`.
pub fn register<F: Family>(registry: &Registry, spec: &FamilySpec) -> Result<F, MetricsError> {
    F::build(spec)
        .and_then(|family| registry.register(Box::new(family.clone())).map(|()| family))
        .map_err(|source| MetricsError::Register {
            name: spec.name,
            source,
        })
}

/// The Prometheus type of a declared handle type, for the docs.
macro_rules! family_type {
    (IntCounter) => {
        "counter"
    };
    (IntCounterVec) => {
        "counter"
    };
    (IntGauge) => {
        "gauge"
    };
    (IntGaugeVec) => {
        "gauge"
    };
    (GaugeVec) => {
        "gauge"
    };
    (Histogram) => {
        "histogram"
    };
    (HistogramVec) => {
        "histogram"
    };
}

/// Declares a struct of metric families, one entry per family:
///
/// ```text
/// field: Type { name: kvgate_..., help: "...", labels: [a, b], buckets: BOUNDS },
/// ```
///
/// (`labels` for the `…Vec` types only, `buckets` for histograms only). The struct gets
/// one private handle per family, so that recording goes through the methods the declaring
/// module writes; `register`, which builds and registers them all; and a docs table of
/// name, type, labels and help.
macro_rules! metric_families {
    (
        $(#[$meta:meta])*
        $vis:vis struct $families:ident {
            $(
                $field:ident: $ty:ident {
                    name: $name:ident,
                    help: $help:literal
                    $(, labels: [$($label:ident),* $(,)?])?
                    $(, buckets: $buckets:expr)?
                    $(,)?
                }
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        ///
        /// | metric | type | labels | help |
        /// |---|---|---|---|
        $(
            #[doc = concat!(
                "| `", stringify!($name), "` | ", $crate::metrics::family::family_type!($ty),
                " | ", $(stringify!($($label),*),)? " | ", $help, " |"
            )]
        )*
        $vis struct $families {
            $($field: $ty,)*
        }

        impl $families {
            /// Builds every family and registers it in `registry`.
            pub(crate) fn register(
                registry: &::prometheus::Registry,
            ) -> Result<Self, $crate::metrics::MetricsError> {
                Ok(Self {
                    $(
                        $field: $crate::metrics::family::register::<$ty>(
                            registry,
                            &$crate::metrics::family::metric_families!(
                                @spec $name, $help, [$($($label),*)?], $($buckets)?
                            ),
                        )?,
                    )*
                })
            }
        }
    };
    (@spec $name:ident, $help:literal, [$($label:ident),*], $($buckets:expr)?) => {
        $crate::metrics::family::FamilySpec {
            name: stringify!($name),
            help: $help,
            labels: &[$(stringify!($label)),*],
            buckets: $crate::metrics::family::metric_families!(@buckets $($buckets)?),
        }
    };
    (@buckets) => {
        &[]
    };
    (@buckets $buckets:expr) => {
        $buckets
    };
}

pub(crate) use {family_type, metric_families};

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.1, 1.0];

    fn spec(labels: &'static [&'static str], buckets: &'static [f64]) -> FamilySpec {
        FamilySpec {
            name: "kvgate_test",
            help: "A family of the tests.",
            labels,
            buckets,
        }
    }

    fn registers<F: Family>(spec: FamilySpec) -> bool {
        register::<F>(&Registry::new(), &spec).is_ok()
    }

    #[test]
    fn a_spec_that_does_not_fit_its_type_is_refused() {
        assert!(registers::<IntCounter>(spec(&[], &[])));
        assert!(!registers::<IntCounter>(spec(&["pod"], &[])));
        assert!(!registers::<IntCounter>(spec(&[], BOUNDS)));
        assert!(registers::<IntCounterVec>(spec(&["pod"], &[])));
        assert!(!registers::<IntCounterVec>(spec(&[], &[])));
        assert!(registers::<Histogram>(spec(&[], BOUNDS)));
        assert!(!registers::<Histogram>(spec(&[], &[])));
        assert!(registers::<HistogramVec>(spec(&["model"], BOUNDS)));
        assert!(!registers::<GaugeVec>(spec(&["pod"], BOUNDS)));
    }

    metric_families! {
        /// Two families, for the tests.
        pub struct TwoFamilies {
            hits: IntCounterVec {
                name: kvgate_test_hits_total,
                help: "Hits, by pod.",
                labels: [pod, result],
            },
            wait: Histogram {
                name: kvgate_test_wait_seconds,
                help: "Waits.",
                buckets: BOUNDS,
            },
        }
    }

    #[test]
    fn a_declared_family_is_registered_as_declared() {
        let registry = Registry::new();
        let families = TwoFamilies::register(&registry).expect("valid declarations");
        families.hits.with_label_values(&["a", "ok"]).inc();
        families.wait.observe(0.5);
        let gathered = registry.gather();
        let hits = gathered
            .iter()
            .find(|f| f.name() == "kvgate_test_hits_total")
            .expect("hits registered");
        assert_eq!(hits.help(), "Hits, by pod.");
        let labels: Vec<&str> = hits.get_metric()[0]
            .get_label()
            .iter()
            .map(|l| l.name())
            .collect();
        assert_eq!(labels, ["pod", "result"]);
        let wait = gathered
            .iter()
            .find(|f| f.name() == "kvgate_test_wait_seconds")
            .expect("wait registered");
        let bounds: Vec<f64> = wait.get_metric()[0]
            .get_histogram()
            .get_bucket()
            .iter()
            .map(|b| b.upper_bound())
            .collect();
        assert_eq!(bounds, BOUNDS);
        assert!(
            TwoFamilies::register(&registry).is_err(),
            "registered twice"
        );
    }
}

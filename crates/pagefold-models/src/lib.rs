//! Reference models pagefold is checked against, shared by the integration
//! tests (a dev-dependency of the `pagefold` crate) and the fuzz targets
//! (`fuzz/`, a path dependency): each runs the same operations against the
//! real library and a model here and demands the same outcome after every
//! step. Test code: a model panics where the library under test breaks a
//! rule the model relies on.

pub mod dedup_model;
pub mod model;

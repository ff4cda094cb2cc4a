from tests.model.conftest import staged_mobilenet  # noqa: F401  (the evaluation stage's KID features)

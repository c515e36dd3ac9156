//! CPU lists and masks in util-linux syntax.

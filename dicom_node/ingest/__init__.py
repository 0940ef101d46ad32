"""From a received data set to a queued study: the C-STORE handler, selection and study assembly."""

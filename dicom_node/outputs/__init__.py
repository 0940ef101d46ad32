"""DICOM encoding of the AI result: TID 1500 SR, Secondary Capture and GSPS encoders, which never import each
other, and the modules they share (codes, equipment, series, source header, geometry, captions, ...)."""

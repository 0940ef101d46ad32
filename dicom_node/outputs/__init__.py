"""DICOM encoding of the AI result: TID 1500 SR, Secondary Capture, GSPS, their codes and shared identity."""

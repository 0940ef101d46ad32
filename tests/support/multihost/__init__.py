"""A dicom-node cluster on one machine, hosts as network namespaces (:mod:`support.netns`): see
:mod:`support.multihost.cluster`."""

-- Orthanc auto-routing rule: forward chest radiographs to the dicom-node AI node.
--
-- Load it with "LuaScripts" in orthanc.json. Orthanc calls OnStoredInstance once for every instance
-- it stores. CR and DX images of the chest (BodyPartExamined CHEST, THORAX or LUNG, or no body part
-- at all) are sent by C-STORE to the modality named NODE in "DicomModalities". Orthanc sends in the
-- background (a Lua job): a node that is down makes the job fail and shows it under /jobs; Orthanc
-- does not retry it by itself.
--
-- Loop protection: the node sends its results (SR, Secondary Capture, GSPS) back with its own AE
-- title as calling AE. Those are never routed, whatever they contain. The node's AE title is read
-- from its "DicomModalities" entry, so AE title, host and port are set in one place: orthanc.json.
--
-- The node itself selects what it analyses (frontal PA/AP views) and ignores its own outputs too;
-- this rule only keeps unrelated images and result objects off the wire.

local NODE = 'ainode'              -- symbolic name of the AI node in "DicomModalities"
local SKIP_NODE_OUTPUTS = true     -- never route instances the node sent (loop protection)
local ROUTE_EVERYTHING = false     -- route every stored instance, SR/SC/PR included (testing only)

local MODALITIES = { CR = true, DX = true }
local BODY_PARTS = { CHEST = true, THORAX = true, LUNG = true, [''] = true }

local function Normalized(value)
   if type(value) ~= 'string' then
      return ''
   end
   return string.upper((string.gsub(value, '^%s*(.-)%s*$', '%1')))
end

local function NodeAet()
   local modalities = GetOrthancConfiguration()['DicomModalities'] or {}
   local entry = modalities[NODE]
   if entry == nil then
      error('route-chest-xrays.lua: no modality named "' .. NODE .. '" in DicomModalities')
   end
   -- An entry is either [ "AET", "host", port ] or { "AET" : ..., "Host" : ..., "Port" : ... }
   return Normalized(entry['AET'] or entry[1])
end

local NODE_AET = NodeAet()

function OnStoredInstance(instanceId, tags, metadata, origin)
   if SKIP_NODE_OUTPUTS and origin ~= nil and origin['RequestOrigin'] == 'DicomProtocol' and
      Normalized(origin['RemoteAet']) == NODE_AET then
      print('route-chest-xrays: not routing ' .. instanceId .. ': sent by the AI node')
      return
   end

   local modality = Normalized(tags['Modality'])
   if ROUTE_EVERYTHING or (MODALITIES[modality] and BODY_PARTS[Normalized(tags['BodyPartExamined'])]) then
      print('route-chest-xrays: routing ' .. instanceId .. ' (' .. modality .. ') to ' .. NODE)
      SendToModality(instanceId, NODE)
   end
end

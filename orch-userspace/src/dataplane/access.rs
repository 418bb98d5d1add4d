//! The map access the reconciler needs, as traits: the data plane implements them, the
//! reconciler's tests fake them.

use orch_common::maps::{
    Backend as MapBackend, BackendKey, MaglevReply, MaglevTable, PortBitmap, ServiceKey,
    ServiceValue, SlotTable,
};

/// The map writes the reconciler needs; the data plane implements it, tests fake it.
pub trait MapWriter {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set_backend(&mut self, id: u32, backend: &MapBackend) -> Result<(), Self::Error>;
    fn set_slot_table(&mut self, index: u32, table: &SlotTable) -> Result<(), Self::Error>;
    fn set_maglev_table(&mut self, index: u32, table: &MaglevTable) -> Result<(), Self::Error>;
    /// Removes a Maglev table; one that is not there is no error.
    fn remove_maglev_table(&mut self, index: u32) -> Result<(), Self::Error>;
    fn set_maglev_reply(
        &mut self,
        key: &BackendKey,
        value: &MaglevReply,
    ) -> Result<(), Self::Error>;
    /// Removes a Maglev reply entry; one that is not there is no error.
    fn remove_maglev_reply(&mut self, key: &BackendKey) -> Result<(), Self::Error>;
    fn set_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), Self::Error>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), Self::Error>;
    fn set_ports(&mut self, index: u32, ports: &PortBitmap) -> Result<(), Self::Error>;
    /// Zeroes the traffic counters of a service id about to be given to a new service.
    fn zero_service_counters(&mut self, id: u32) -> Result<(), Self::Error>;
}

/// The map reads [`Reconciler::adopt`] needs to take over maps a previous daemon filled.
pub trait MapReader {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Every entry of the services map.
    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, Self::Error>;
    fn slot_table(&self, index: u32) -> Result<SlotTable, Self::Error>;
    /// Maglev table `index`, if there is one.
    fn maglev_table(&self, index: u32) -> Result<Option<Box<MaglevTable>>, Self::Error>;
    /// Every Maglev reply entry.
    fn maglev_replies(&self) -> Result<Vec<(BackendKey, MaglevReply)>, Self::Error>;
    /// Every backend entry that is in use ([`MapBackend::in_use`]), with its id.
    fn backends(&self) -> Result<Vec<(u32, MapBackend)>, Self::Error>;
    fn ports(&self, index: u32) -> Result<PortBitmap, Self::Error>;
}
